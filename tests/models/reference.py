"""Shared helpers for parity tests against transformers' PyTorch models (the numerical reference)."""

from __future__ import annotations

import numpy as np


def padded_text_batch(vocab_size: int, lengths=(7, 4, 1), *, seed: int = 0, pad_id: int = 0, low: int = 3):
    """A right-padded batch of random token ids with unequal lengths: ``(input_ids, attention_mask)`` as int32."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    input_ids = np.full((len(lengths), width), pad_id, np.int32)
    attention_mask = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        input_ids[i, :n] = rng.integers(low, vocab_size, n)
        attention_mask[i, :n] = 1
    return input_ids, attention_mask


def save_torch_model(torch_model, path) -> str:
    """``save_pretrained`` a (random, tiny) transformers model in float32 safetensors; returns the directory."""
    torch_model = torch_model.float().eval()
    torch_model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def torch_logits(torch_model, **inputs) -> np.ndarray:
    """The reference output of a transformers model in eval mode, as float32 numpy (logits, else last hidden state)."""
    import torch

    torch_model.eval()
    with torch.no_grad():
        out = torch_model(**{k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items()})
    value = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return value.float().numpy()


def assert_close(actual, expected, *, atol: float, mask=None) -> None:
    """Asserts max |actual - expected| <= atol, optionally only where ``mask`` (a [B, T] attention mask) is 1."""
    actual = np.asarray(actual, np.float32)
    expected = np.asarray(expected, np.float32)
    assert actual.shape == expected.shape, f"shape {actual.shape} != reference shape {expected.shape}"
    diff = np.abs(actual - expected)
    if mask is not None:
        diff = diff[np.asarray(mask).astype(bool)]
    assert diff.max() <= atol, f"max abs difference {diff.max():.3g} > {atol}"


def tiny_bert_config(**overrides):
    """The tiny `transformers.BertConfig` of the BERT-family tests (2 layers, width 64, vocab 256)."""
    import transformers

    sizes = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
    return transformers.BertConfig(**{**sizes, "vocab_size": 256, **overrides})


def tiny_bert(path, cls_name: str = "BertModel", *, seed: int = 0, **overrides):
    """A seeded random tiny transformers BERT (``cls_name``) saved as safetensors in ``path``: ``(model, dir)``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(tiny_bert_config(**overrides))
    return model, save_torch_model(model, path)


def tiny_model(path, cls_name: str, config, *, seed: int = 0, std: float | None = None, jitter: float | None = None):
    """A seeded random transformers model (``cls_name`` built from ``config``) saved in ``path``: ``(model, dir)``.

    ``std`` re-draws every parameter from N(0, std): transformers' own initialisation leaves fresh classifier heads
    with near-zero logits, which a parity test at 1e-5 would pass almost regardless of the head's numerics.
    ``jitter`` instead adds N(0, jitter) noise to every parameter, so that biases (initialised to zero) and norm
    scales (initialised to one) differ from their defaults while keeping their scale.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config)
    if std is not None:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0.0, std)
    if jitter is not None:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * jitter)
    return model, save_torch_model(model, path)
