"""Blocks shared by the decoder architectures (GPT-2, the Llama family): causal attention, the last-token pooling of
sequence classification, and the task check."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from finetune.errors import ConfigError
from finetune.models.dropout import attend

TASKS = ("causal-lm", "text-classification", "token-classification", "feature-extraction")


def check_task(task: str, num_labels: int | None) -> None:
    """Refuses a task the decoders have no head for, or a classification head without ``num_labels``."""
    if task not in TASKS:
        raise ConfigError(f"`task` must be one of {', '.join(TASKS)}; received task={task!r}. Pick one of these.")
    if task in ("text-classification", "token-classification") and not num_labels:
        raise ConfigError(
            f"`num_labels` must be a positive integer for task={task!r}; received num_labels={num_labels!r}. "
            "Pass the number of classes (1 for regression)."
        )


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


def last_token(input_ids: jax.Array, attention_mask: jax.Array | None, pad_token_id: int | None) -> jax.Array:
    """The position of each row's last token, ``[B]``, found as transformers does: the row the sequence head reads.

    With a ``pad_token_id``: the rightmost token that is not padding (``argmax(index * (ids != pad))``), exactly
    transformers' rule. Without one, transformers only accepts batches of one and takes the last position; here the
    last position the attention mask keeps is taken instead, which agrees with it and also handles padded batches.
    """
    if pad_token_id is not None:
        keep = input_ids != pad_token_id
    elif attention_mask is not None:
        keep = attention_mask.astype(bool)
    else:
        return jnp.full(input_ids.shape[:1], input_ids.shape[1] - 1)
    return jnp.argmax(jnp.arange(input_ids.shape[1]) * keep, axis=-1)
