"""Per-task loss, targets and predictions, all over masked (padded) batches.

A batch is a dict of arrays: the model inputs (Hugging Face names), ``labels``, and ``example_mask`` ([B], 0 for the
rows that pad the last batch). Causal LM batches may carry ``loss_mask`` ([B, T], 1 on completion tokens).
Every loss is a weighted mean whose weights are 0 on padding, so padding never moves the loss or the metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from finetune.errors import ConfigError

IGNORE = -100  # label id of positions that carry no label (sub-tokens, padding), as in transformers
NOT_INPUTS = frozenset({"labels", "example_mask", "loss_mask"})


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a batch the model is called with."""
    return {k: v for k, v in batch.items() if k not in NOT_INPUTS}


def kind(task: str, logits_shape: tuple[int, ...], labels: Any) -> str:
    """The loss family: ``single`` (softmax CE), ``multi`` (sigmoid BCE), ``regression`` (MSE), ``token``, ``lm``."""
    if task == "causal-lm":
        return "lm"
    if task == "token-classification":
        return "token"
    if task in ("text-classification", "image-classification"):
        if logits_shape[-1] == 1:
            return "regression"
        if labels is not None and jnp.ndim(labels) == 2:
            return "multi"
        return "single"
    raise ConfigError(
        f"Task {task!r} has no training loss. `fit` and `evaluate` need one of text-classification, "
        "token-classification, image-classification or causal-lm; use `predict` for feature-extraction."
    )


def targets(family: str, logits: jax.Array, batch: Mapping[str, Any]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(logits, labels, weights)`` flattened to one row per scored item (example or token), weights 0 on padding."""
    example = batch["example_mask"].astype(jnp.float32)
    if family == "lm":
        labels = batch["labels"] if "labels" in batch else batch["input_ids"]
        mask = batch.get("loss_mask", batch.get("attention_mask", jnp.ones(labels.shape, jnp.int32)))
        logits, labels, mask = logits[:, :-1], labels[:, 1:], mask[:, 1:]
        weights = mask.astype(jnp.float32) * (labels != IGNORE) * example[:, None]
        return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), weights.reshape(-1)
    labels = batch["labels"]
    if family == "token":
        weights = (labels != IGNORE).astype(jnp.float32) * example[:, None]
        return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), weights.reshape(-1)
    return logits, labels, example


def per_item_loss(family: str, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Unweighted loss of every scored item, in float32."""
    logits = logits.astype(jnp.float32)
    if family == "regression":
        return jnp.square(logits[:, 0] - labels.astype(jnp.float32))
    if family == "multi":
        return optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)).mean(-1)
    safe = jnp.where(labels == IGNORE, 0, labels).astype(jnp.int32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, safe)


def loss_fn(task: str, custom: Callable | None = None) -> Callable:
    """``(logits, batch) -> (mean loss, Scored)`` for the task; runs inside the jitted step.

    ``custom`` replaces the per-item loss: ``custom(logits, labels) -> [N]`` on the flattened, scored items.
    """

    def compute(logits, batch):
        family = kind(task, logits.shape, batch.get("labels"))
        flat_logits, labels, weights = targets(family, logits, batch)
        items = (custom or (lambda lg, lb: per_item_loss(family, lg, lb)))(flat_logits, labels)
        loss = jnp.sum(items * weights) / jnp.maximum(jnp.sum(weights), 1.0)
        return loss, Scored(family, flat_logits, labels, weights, items)

    return compute


class Scored(NamedTuple):
    """The scored items of one batch, flattened: what metrics are computed from."""

    family: str
    logits: jax.Array
    labels: jax.Array
    weights: jax.Array
    losses: jax.Array


def predictions(family: str, logits: jax.Array) -> dict[str, jax.Array]:
    """What `predict` returns per item: ``labels`` and ``probabilities`` (``predictions`` for regression)."""
    logits = logits.astype(jnp.float32)
    if family == "regression":
        return {"predictions": logits[..., 0]}
    if family == "multi":
        probs = jax.nn.sigmoid(logits)
        return {"labels": (probs > 0.5).astype(jnp.int32), "probabilities": probs}
    probs = jax.nn.softmax(logits, -1)
    return {"labels": jnp.argmax(logits, -1), "probabilities": probs}
