"""A tiny NNX classifier with its own default rules, and data it can learn, for fast core tests."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx


class TinyClassifier(nnx.Module):
    """Embedding-free MLP: ``encoder`` (two layers) -> ``head`` (pretrained) -> ``classifier`` (new)."""

    def __init__(self, features: int = 8, hidden: int = 16, classes: int = 3, *, seed: int = 0, dropout: float = 0.0):
        rngs = nnx.Rngs(seed)
        self.encoder = nnx.List([nnx.Linear(features, hidden, rngs=rngs), nnx.Linear(hidden, hidden, rngs=rngs)])
        self.norm = nnx.LayerNorm(hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, hidden, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.classifier = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x):
        for layer in self.encoder:
            x = jax.nn.gelu(layer(x))
        x = self.dropout(jax.nn.gelu(self.head(self.norm(x))))
        return self.classifier(x)

    def default_rules(self):
        return [(r"classifier/.*", "new"), (r"head/.*", "head"), (r".*", "backbone")]


def blobs(n: int = 100, features: int = 8, classes: int = 3, *, seed: int = 0):
    """Separable Gaussian blobs: ``(x float32 [n, features], y int32 [n])``."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n).astype(np.int32)
    centers = rng.normal(0, 3, (classes, features))
    x = (centers[y] + rng.normal(0, 1, (n, features))).astype(np.float32)
    return x, y


def params_of(model) -> dict:
    """``{path: numpy array}`` of every parameter of a finetune.Model."""
    from finetune.params.rules import flatten

    return {k: np.array(v) for k, v in flatten(nnx.to_pure_dict(nnx.state(model.module, nnx.Param))).items()}
