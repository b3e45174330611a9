"""Attention shared by every architecture: bidirectional multi-head self-attention (`Attention`, the encoders'
module, with its projections) and causal, optionally sliding-window, grouped-query attention (`causal_attention`, the
decoders' core: their projections differ, their attention does not)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from finetune.models.blocks.dropout import Dropout, attend
from finetune.models.blocks.layers import Dtype, dense


class Attention(nnx.Module):
    """Multi-head self-attention; the padding mask hides keys. Attention-probability dropout only in training.

    ``cfg`` gives ``hidden_size``, ``num_heads`` and ``attention_dropout``. ``qkv_bias=False`` builds the
    query/key/value projections without biases (ViT's ``qkv_bias``)."""

    def __init__(self, cfg: Any, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs, qkv_bias: bool = True):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        width, self.num_heads = cfg.hidden_size, cfg.num_heads
        self.query = dense(width, width, ("embed", "heads"), **kw, use_bias=qkv_bias)
        self.key = dense(width, width, ("embed", "heads"), **kw, use_bias=qkv_bias)
        self.value = dense(width, width, ("embed", "heads"), **kw, use_bias=qkv_bias)
        self.output = dense(width, width, ("heads", "embed"), **kw)
        self.dropout = Dropout(cfg.attention_dropout, rngs=rngs)

    def __call__(self, x: jax.Array, mask: Any, queries: Any = None, rows: Any = None) -> jax.Array:
        """``x``: ``[B, T, H]``; ``mask`` hides keys. ``queries`` (``[B, Q, H]``, default ``x``) are the positions
        whose outputs are computed: keys and values always come from all of ``x``. With ``rows`` (``[E]``), query
        ``e`` (``queries`` then ``[E, Q, H]``) takes its keys and values from row ``rows[e]`` of ``x`` (packed
        examples: `finetune.data.batches.ArrayData.take_packed`)."""
        r, t, width = x.shape
        queries = x if queries is None else queries
        b = queries.shape[0]
        q = self.query(queries).reshape(b, queries.shape[1], self.num_heads, -1)
        k, v = (proj(x).reshape(r, t, self.num_heads, -1) for proj in (self.key, self.value))
        if rows is not None:
            k, v = k[rows], v[rows]
        if self.dropout.deterministic or self.dropout.rate == 0:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask)
        else:  # the fused kernel has no dropout; spell the attention out when training
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
            out = attend(jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype), v, self.dropout)
        return self.output(out.reshape(b, queries.shape[1], width))


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    *,
    dropout: nnx.Dropout,
    scale: float | None = None,
    window: int | None = None,
    positions: jax.Array | None = None,
) -> jax.Array:
    """Causal (optionally sliding-window) grouped-query attention, ``[B, T, heads, head_dim]`` in and out.

    ``mask`` is the ``[B, 1, 1, T]`` boolean key mask of the padding; ``scale`` defaults to ``1/sqrt(head_dim)``.
    ``positions`` (``[B, Q]``) places the queries when they are not all ``T`` positions (`head_rows`): query ``i``
    of row ``b`` sees the keys up to ``positions[b, i]``. Without dropout this is `jax.nn.dot_product_attention`;
    with attention dropout in training it is spelled out, since that has none.
    """
    query = jnp.arange(q.shape[1])[None, :] if positions is None else positions
    if dropout.deterministic or dropout.rate == 0:
        if positions is None:
            local = None if window is None else (window - 1, 0)
            return jax.nn.dot_product_attention(
                q, k, v, mask=mask, scale=scale, is_causal=True, local_window_size=local
            )
        return jax.nn.dot_product_attention(q, k, v, mask=_allowed(query, k.shape[1], window, mask), scale=scale)
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(jnp.where(_allowed(query, k.shape[1], window, mask), logits, jnp.finfo(jnp.float32).min), -1)
    return attend(probs, v, dropout)


def _allowed(query: jax.Array, keys: int, window: int | None, mask: jax.Array | None) -> jax.Array:
    """``[B or 1, 1, Q, K]``: key ``k`` is visible to a query at position ``p`` when ``k <= p`` (and within the
    window, and not padding)."""
    query, key = query[:, None, :, None], jnp.arange(keys)[None, None, None, :]
    allowed = key <= query
    if window is not None:
        allowed &= key > query - window
    if mask is not None:
        allowed = allowed & mask
    return allowed
