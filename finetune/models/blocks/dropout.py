"""Dropout for every architecture: `flax.nnx.Dropout` whose keep mask costs almost nothing to draw.

nnx.Dropout draws a 32-bit uniform float per element from threefry (``jax.random.bernoulli``); on CPU that
generation was the largest part of dropout's cost in a train step (docs/performance.md, under "finetune.models.blocks").

How: each call still takes a fresh key from the module's threefry stream (so calls, layers and steps stay
independent and reproducible). Within one call, element pair ``i`` of the array (its position in the global,
row-major array) gets ``mix(mix(i ^ k0) + k1)`` for the key's two words, where ``mix`` is a 32-bit integer hash
with full avalanche; each 32-bit result gives two 16-bit draws, compared with ``round(keep * 2**16)`` (the rate is
exact to 1.5e-5). The draw depends only on the key and the position, never on how the array is split over devices,
so sharded runs draw the same masks as one device.

Because a mask is a pure function of its key, the backward pass can redraw it instead of storing what it dropped:
`attend` (attention probabilities through dropout, then times the values) keeps only the probabilities and the key,
not the dropped copy.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

_LEVELS = 1 << 16


class Dropout(nnx.Dropout):
    """`flax.nnx.Dropout` (same arguments, attributes and RNG state) with cheap counter-based 16-bit draws."""

    def __call__(self, inputs, *, deterministic: bool | None = None, rngs=None):
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic or self.rate == 0:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        return drop(inputs, next_key(self, rngs), self.rate, self.broadcast_dims)


def next_key(dropout: nnx.Dropout, rngs=None) -> jax.Array:
    """The next key of ``dropout``'s stream (or of ``rngs``, as `nnx.Dropout` takes it: `nnx.Rngs`, stream or key)."""
    rngs = dropout.rngs if rngs is None else rngs
    if isinstance(rngs, nnx.Rngs):
        rngs = rngs[dropout.rng_collection]
    if isinstance(rngs, nnx.RngStream):
        return draw(rngs)
    return rngs if isinstance(rngs, jax.Array) else rngs()


def draw(stream: nnx.RngStream) -> jax.Array:
    """``stream()``: the same key, ``fold_in(key, count)``, and the count advanced, but the count replaced whole.

    nnx's ``count[...] += 1`` compares the new value's sharding with the old one's; on a tracer, reading
    ``.sharding`` raises an error whose message walks every equation traced so far, so the cost grows with the
    square of the model's depth.
    """
    count = stream.count.get_value()
    key = jax.random.fold_in(stream.key.get_value(), count)
    stream.count.set_value(count + 1)
    return key


def drop(inputs: jax.Array, key: jax.Array, rate: float, broadcast_dims: Sequence[int] = ()) -> jax.Array:
    """``inputs`` with each element zeroed with probability ``rate`` (the rest scaled by ``1 / keep``): a pure
    function of ``key`` and the position, shared along ``broadcast_dims``."""
    threshold = round((1.0 - rate) * _LEVELS)  # 0 to 2**16: compared in 32 bits, since 2**16 overflows uint16
    if threshold == 0:
        return jnp.zeros_like(inputs)
    shape = list(inputs.shape)
    for axis in broadcast_dims:
        shape[axis] = 1
    keep = jnp.broadcast_to(bits16(key, tuple(shape)).astype(jnp.uint32) < threshold, inputs.shape)
    return jnp.where(keep, inputs * (_LEVELS / threshold), 0).astype(inputs.dtype)


def attend(probs: jax.Array, v: jax.Array, dropout: nnx.Dropout) -> jax.Array:
    """Attention output ``einsum("bhqk,bkhd->bqhd", dropout(probs), v)``, cast to ``v``'s dtype after dropout.

    In training the backward pass redraws the mask from its key rather than storing the dropped probabilities (the
    softmax's backward keeps ``probs`` anyway); the result and its gradients are the same as spelling it out.
    """
    if dropout.deterministic or dropout.rate == 0:
        return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    return _dropped_attention(probs, v, next_key(dropout), dropout.rate)


@functools.partial(jax.checkpoint, static_argnums=(3,))
def _dropped_attention(probs: jax.Array, v: jax.Array, key: jax.Array, rate: float) -> jax.Array:
    return jnp.einsum("bhqk,bkhd->bqhd", drop(probs, key, rate).astype(v.dtype), v)


def _mix(x: jax.Array) -> jax.Array:
    """A 32-bit integer hash (a bijection with full avalanche: xorshift-multiply, twice)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def bits16(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``uint16`` random integers of ``shape`` from ``key``: a counter-based draw (see the module docstring).

    Elementwise in the position (no stacking of the two halves), so XLA fuses the draw into the mask's consumer.
    """
    k = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
    if not shape:
        return bits16(key, (1,)).reshape(())
    half_width = (shape[-1] + 1) // 2  # pairs per row (a row of odd length ends with half a pair)
    column = jax.lax.broadcasted_iota(jnp.uint32, shape, len(shape) - 1)
    pair = column >> 1
    stride = half_width
    for axis in range(len(shape) - 2, -1, -1):
        pair = pair + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    x = _mix(_mix(pair ^ k[0]) + k[1])
    return jnp.where((column & 1) == 0, x >> 16, x & 0xFFFF).astype(jnp.uint16)
