"""Per-task loss, targets and predictions, all over masked (padded) batches.

A batch is a dict of arrays: the model inputs (Hugging Face names), ``labels``, and ``example_mask`` ([B], 0 for the
rows that pad the last batch). Causal LM batches may carry ``loss_mask`` ([B, T], 1 on completion tokens).
Every loss is a weighted mean whose weights are 0 on padding, so padding never moves the loss or the metrics.

What predict returns (`finetune.Model.predict`), per task, by default:

* classification: ``logits``, ``labels`` (class ids; 0/1 per label for multi-label) and ``probabilities``
  (softmax; sigmoid for multi-label); regression heads: ``logits`` and ``predictions`` [N].
  Token classification gives them per token, ``[N, T, ...]`` padded to the longest example.
* ``causal-lm``: ``log_likelihood`` [N] (the summed log-probability of each example's scored tokens: every
  token after the first, or the completion of prompt / completion data, as the loss scores them),
  ``num_tokens`` [N] (how many were scored), ``perplexity`` [N] (``exp(-log_likelihood / num_tokens)``) and
  ``next_token_ids`` [N, T] (the most likely token after each position; -100 on padding). The
  ``[N, T, vocab]`` logits come only when asked (``outputs=["logits", ...]``). Text generation is not
  part of `predict`.
* ``feature-extraction``: ``embeddings`` [N, D], one sentence embedding per example, pooled as the
  checkpoint's sentence-transformers config says (``1_Pooling/config.json``, and unit length when
  ``modules.json`` has a Normalize module), else the mean over the real tokens (`finetune.models.heads.pool`);
  ``outputs=["embeddings", "token_embeddings"]`` adds the token states as a list of ``[T_i, H]`` arrays,
  one per example, without padding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from finetune.errors import ConfigError
from finetune.metrics import Scored
from finetune.models.heads import pool

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


# What `predict` returns per family: (the default outputs, every output it can give). Causal LMs and feature extractors
# never return a [N, T, vocab] or padded [N, T, H] tensor unless asked.
PREDICT_OUTPUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "single": (("logits", "labels", "probabilities"),) * 2,
    "multi": (("logits", "labels", "probabilities"),) * 2,
    "token": (("logits", "labels", "probabilities"),) * 2,
    "regression": (("logits", "predictions"),) * 2,
    "lm": (
        ("log_likelihood", "num_tokens", "perplexity", "next_token_ids"),
        ("log_likelihood", "num_tokens", "perplexity", "next_token_ids", "logits"),
    ),
    "features": (("embeddings",), ("embeddings", "token_embeddings")),
}


def predict_family(task: str, num_outputs: int, known: str | None) -> str:
    """The family whose outputs `predict` gives: ``features`` for feature extraction, else the loss family (the one
    training saw when known, else from the head's width)."""
    if task == "feature-extraction":
        return "features"
    return known or kind(task, (num_outputs,), None)


def output_names(family: str, outputs: Sequence[str] | None) -> tuple[str, ...]:
    """The outputs to compute: the family's defaults, or ``outputs`` checked against what the family gives."""
    default, allowed = PREDICT_OUTPUTS[family]
    if outputs is None:
        return default
    names = (outputs,) if isinstance(outputs, str) else outputs
    if not isinstance(names, Sequence) or not names or any(n not in allowed for n in names):
        raise ConfigError(
            f"`outputs` must be a list of names from {', '.join(allowed)} for this model; received "
            f"outputs={outputs!r}. Pass some of them, or None for {', '.join(default)}."
        )
    return tuple(dict.fromkeys(names))


def predictions(
    logits: jax.Array, batch: Mapping[str, Any], *, family: str, names: tuple[str, ...], pooling: Any = None
) -> dict[str, jax.Array]:
    """The outputs ``names`` of one batch, traced into the predict step (so only they travel to the host).

    Per family: ``logits``, ``labels`` and ``probabilities`` (softmax; sigmoid for multi-label), or ``predictions``
    (regression); for causal LMs (`_lm_outputs`) the log-likelihood of each example's scored tokens, their number,
    the perplexity and the argmax next-token ids; for feature extraction the pooled ``embeddings`` (`pooling`) and
    the ``token_embeddings`` with their ``token_mask``.
    """
    if family == "features":
        mask = batch.get("attention_mask")
        mask = jnp.ones(logits.shape[:2], jnp.int32) if mask is None else mask
        out = {"embeddings": logits.astype(jnp.float32) if logits.ndim == 2 else pool(logits, mask, pooling)}
        if "token_embeddings" in names:
            out.update(token_embeddings=logits.astype(jnp.float32), token_mask=mask)
        return {k: v for k, v in out.items() if k in names or k == "token_mask"}
    if family == "lm":
        out = _lm_outputs(logits, batch)
    else:
        out = {"logits": logits, **_class_outputs(family, logits)}
    return {k: v for k, v in out.items() if k in names}


def _class_outputs(family: str, logits: jax.Array) -> dict[str, jax.Array]:
    logits = logits.astype(jnp.float32)
    if family == "regression":
        return {"predictions": logits[..., 0]}
    if family == "multi":
        probs = jax.nn.sigmoid(logits)
        return {"labels": (probs > 0.5).astype(jnp.int32), "probabilities": probs}
    return {"labels": jnp.argmax(logits, -1), "probabilities": jax.nn.softmax(logits, -1)}


def _lm_outputs(logits: jax.Array, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The tokens the loss scores (`targets`: after the first, on ``loss_mask`` when given, else the real tokens):
    their summed log-probability, count and perplexity; and the argmax id of the token after every position (-100
    on padding)."""
    flat_logits, labels, weights = targets("lm", logits, batch)
    items = per_item_loss("lm", flat_logits, labels).reshape(logits.shape[0], -1)
    weights = weights.reshape(items.shape)
    count = weights.sum(1)
    log_likelihood = -(items * weights).sum(1)
    mask = batch.get("attention_mask", jnp.ones(logits.shape[:2], jnp.int32))
    return {
        "logits": logits,
        "log_likelihood": log_likelihood,
        "num_tokens": count.astype(jnp.int32),
        "perplexity": jnp.where(count > 0, jnp.exp(-log_likelihood / jnp.maximum(count, 1.0)), jnp.nan),
        "next_token_ids": jnp.where(mask > 0, jnp.argmax(logits, -1), IGNORE).astype(jnp.int32),
    }


def collect(parts: Sequence[tuple[Mapping[str, Any], Any]]) -> dict[str, Any]:
    """The per-batch outputs of `predictions` (on the host, with each batch's ``example_mask``) as one result: padding
    rows dropped, batches of other widths padded to the widest (-100 for ids, 0 otherwise), and
    ``token_embeddings`` as a list of ``[T_i, H]`` arrays, one per example, without padding."""
    out: dict[str, Any] = {}
    for name in parts[0][0] if parts else ():
        arrays = [np.asarray(values[name])[np.asarray(example) > 0] for values, example in parts]
        fill = IGNORE if arrays[0].dtype.kind in "iu" and name != "token_mask" else 0
        out[name] = np.concatenate(_same_width(arrays, fill))
    if "token_embeddings" in out:
        mask = out.pop("token_mask").astype(bool)
        out["token_embeddings"] = [states[m] for states, m in zip(out["token_embeddings"], mask, strict=True)]
    return out


def _same_width(arrays: list[np.ndarray], fill: int) -> list[np.ndarray]:
    """Per-token arrays of batches padded to one width (ready batches may each have their own)."""
    if arrays[0].ndim < 2:
        return arrays
    width = max(a.shape[1] for a in arrays)
    return [
        np.pad(a, [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2), constant_values=fill) for a in arrays
    ]


def prediction_rows(model, data, *, batch_size: int | None = None) -> list[dict[str, Any]]:
    """One JSON-ready dict per example, what ``finetune predict`` writes: ``{"prediction": label name (or class id;
    a list of names for multi-label; a number for regression)}``, ``{"embedding": [...]}`` for feature extraction,
    ``{"log_likelihood", "num_tokens", "perplexity"}`` for causal LMs."""
    if model.task == "token-classification":
        raise ConfigError(
            "`finetune predict` writes one prediction per example, and token-classification predicts one per token "
            "(aligned to the tokenizer's pieces, not to words). Use Model.predict in Python, whose `labels` are "
            "[N, T] class ids, or pass --task text-classification for a sequence classifier."
        )
    if model.task == "feature-extraction":
        return [{"embedding": e.tolist()} for e in model.predict(data, batch_size=batch_size)["embeddings"]]
    if model.task == "causal-lm":
        out = model.predict(data, batch_size=batch_size, outputs=["log_likelihood", "num_tokens", "perplexity"])
        return [
            {"log_likelihood": float(ll), "num_tokens": int(n), "perplexity": float(p) if n else None}
            for ll, n, p in zip(out["log_likelihood"], out["num_tokens"], out["perplexity"], strict=True)
        ]
    out = model.predict(data, batch_size=batch_size)
    if "predictions" in out:
        return [{"prediction": float(v)} for v in out["predictions"]]
    names = model.id2label or {}
    if out["labels"].ndim == 2:  # multi-label: the names of the labels predicted on
        return [{"prediction": [names.get(int(i), int(i)) for i in np.flatnonzero(row)]} for row in out["labels"]]
    return [{"prediction": names.get(int(i), int(i))} for i in out["labels"]]
