"""Dropout for every architecture: `flax.nnx.Dropout` whose keep mask costs half the random bits.

nnx.Dropout draws a 32-bit uniform float per element (``jax.random.bernoulli``); on CPU, generating those bits with
threefry was most of the cost of dropout in a MiniLM train step (tests/benchmarks/step_variants.py: 5.8 s/step with
it, 3.2 s without dropout). Comparing 16-bit random integers with ``round(keep * 2**16)`` halves the random bits and
keeps the rate exact to 1.5e-5, with the same threefry keys (so sharded runs draw the same masks as one device).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_LEVELS = 1 << 16


class Dropout(nnx.Dropout):
    """`flax.nnx.Dropout` (same arguments, attributes and RNG state) with 16-bit random draws."""

    def __call__(self, inputs, *, deterministic: bool | None = None, rngs=None):
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic or self.rate == 0:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        rngs = self.rngs if rngs is None else rngs
        key = (
            rngs[self.rng_collection]()
            if isinstance(rngs, nnx.Rngs)
            else rngs
            if isinstance(rngs, jax.Array)
            else rngs()
        )
        threshold = round((1.0 - self.rate) * _LEVELS)
        shape = list(inputs.shape)
        for axis in self.broadcast_dims:
            shape[axis] = 1
        keep = jax.random.bits(key, tuple(shape), jnp.uint16) < threshold
        keep = jnp.broadcast_to(keep, inputs.shape)
        return jnp.where(keep, inputs * (_LEVELS / threshold), 0).astype(inputs.dtype)
