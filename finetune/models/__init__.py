"""NNX architectures that load Hugging Face Hub checkpoints.

`blocks` holds the building blocks every architecture shares (layers, attention, the BERT-family encoder, rotary
embeddings, dropout); `heads` every task head and the pooling of embeddings; `registry` maps a checkpoint's
``model_type`` to its architecture. Each architecture folder (``bert``, ``roberta``, ``distilbert``, ``gpt2``,
``llama``, ``vit``) is a config and a backbone (``modeling.py``) and a key table (``convert.py``).
"""
