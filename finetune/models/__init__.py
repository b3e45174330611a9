"""NNX architectures that load Hugging Face Hub checkpoints (see `registry.py`)."""
