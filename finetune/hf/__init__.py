"""The Hugging Face side: the Hub (resolve, download, upload), checkpoint files, key tables, export and push."""
