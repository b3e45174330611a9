"""Metrics by name, accumulated on device as sums over masked batches and read on the host at log intervals.

Each metric keeps a few sums (``init``), adds one batch's scored items to them inside the jitted step (``update``), and
turns the sums into a number on the host (``result``). Padding has weight 0 and never counts. The definitions follow
scikit-learn's (macro averages over the classes present in the labels or the predictions).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from finetune import violations
from finetune.errors import ConfigError


class Scored(NamedTuple):
    """The scored items of one batch, flattened: what metrics are computed from."""

    family: str
    logits: jax.Array
    labels: jax.Array
    weights: jax.Array
    losses: jax.Array


def _counts(s: Scored, num_classes: int) -> dict[str, jax.Array]:
    """Per-class weighted true positives, predicted and true counts."""
    if s.family == "multi":
        pred = (s.logits > 0).astype(jnp.float32)
        true = s.labels.astype(jnp.float32)
        w = s.weights[:, None]
    else:
        pred = jax.nn.one_hot(jnp.argmax(s.logits, -1), num_classes)
        true = jax.nn.one_hot(jnp.where(s.weights > 0, s.labels, -1), num_classes)
        w = s.weights[:, None]
    return {"tp": jnp.sum(w * pred * true, 0), "pred": jnp.sum(w * pred, 0), "true": jnp.sum(w * true, 0)}


@dataclasses.dataclass(frozen=True)
class Metric:
    """A named metric: sums kept on device, a number on the host."""

    name: str
    kind: str
    average: str = "macro"
    k: int = 1

    def init(self, num_classes: int) -> dict[str, jax.Array]:
        if self.kind == "counts":
            return {key: jnp.zeros((num_classes,), jnp.float32) for key in ("tp", "pred", "true")}
        return {"sum": jnp.zeros((), jnp.float32), "count": jnp.zeros((), jnp.float32)}

    def update(self, acc: Mapping[str, jax.Array], s: Scored) -> dict[str, jax.Array]:
        if self.kind == "counts":
            new = _counts(s, acc["tp"].shape[0])
            return {key: acc[key] + new[key] for key in acc}
        return {"sum": acc["sum"] + jnp.sum(self._values(s) * s.weights), "count": acc["count"] + jnp.sum(s.weights)}

    def _values(self, s: Scored) -> jax.Array:
        if self.kind == "accuracy":
            if s.family == "multi":
                return jnp.all((s.logits > 0) == (s.labels > 0.5), -1).astype(jnp.float32)
            return (jnp.argmax(s.logits, -1) == s.labels).astype(jnp.float32)
        if self.kind == "top_k":
            top = jax.lax.top_k(s.logits, self.k)[1]
            return jnp.any(top == s.labels[:, None], -1).astype(jnp.float32)
        if self.kind in ("mse", "mae"):
            err = s.logits[:, 0].astype(jnp.float32) - s.labels.astype(jnp.float32)
            return jnp.square(err) if self.kind == "mse" else jnp.abs(err)
        return s.losses  # loss, perplexity

    def result(self, acc: Mapping[str, Any]) -> float:
        acc = {k: np.asarray(v, np.float64) for k, v in acc.items()}
        if self.kind != "counts":  # a mean over no example (every step skipped) is NaN, never 0
            mean = float(acc["sum"] / acc["count"]) if acc["count"] > 0 else float("nan")
            return float(np.exp(mean)) if self.kind == "perplexity" else mean
        tp, pred, true = acc["tp"], acc["pred"], acc["true"]
        if self.average == "micro":
            tp, pred, true = tp.sum(keepdims=True), pred.sum(keepdims=True), true.sum(keepdims=True)
        present = (pred + true) > 0
        precision = np.divide(tp, pred, out=np.zeros_like(tp), where=pred > 0)
        recall = np.divide(tp, true, out=np.zeros_like(tp), where=true > 0)
        value = {"precision": precision, "recall": recall}.get(self.name.split("_")[0])
        if value is None:
            denom = precision + recall
            value = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
        return float(value[present].mean()) if present.any() else 0.0


_BY_NAME = {
    "loss": Metric("loss", "loss"),
    "accuracy": Metric("accuracy", "accuracy"),
    "top5_accuracy": Metric("top5_accuracy", "top_k", k=5),
    "f1": Metric("f1", "counts"),
    "f1_macro": Metric("f1_macro", "counts"),
    "f1_micro": Metric("f1_micro", "counts", average="micro"),
    "precision": Metric("precision", "counts"),
    "recall": Metric("recall", "counts"),
    "mse": Metric("mse", "mse"),
    "mae": Metric("mae", "mae"),
    "perplexity": Metric("perplexity", "perplexity"),
}
METRICS = tuple(_BY_NAME)

DEFAULT_METRICS = {
    "single": ("accuracy",),
    "multi": ("accuracy", "f1_micro"),
    "regression": ("mse", "mae"),
    "token": ("accuracy",),
    "lm": ("perplexity",),
}


def resolve(names: Sequence[str | Metric]) -> tuple[Metric, ...]:
    """Metric objects for names like ``"accuracy"``, ``"f1_macro"``, ``"top3_accuracy"``; ``loss`` always first."""
    out = [_BY_NAME["loss"]]
    for name in names:
        if isinstance(name, Metric):
            out.append(name)
        elif name in _BY_NAME:
            out.append(_BY_NAME[name])
        elif isinstance(name, str) and name.startswith("top") and name.endswith("_accuracy") and name[3:-9].isdigit():
            out.append(Metric(name, "top_k", k=int(name[3:-9])))
        else:
            close = difflib.get_close_matches(str(name), METRICS, n=3)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"Unknown metric {name!r} in `metrics`.{hint} Allowed: {', '.join(METRICS)}.")
    return tuple(dict((m.name, m) for m in out).values())


def init(metrics: Sequence[Metric], num_classes: int) -> dict[str, dict[str, jax.Array]]:
    return {m.name: m.init(num_classes) for m in metrics}


def update(metrics: Sequence[Metric], acc: Mapping[str, Any], s: Scored) -> dict[str, dict[str, jax.Array]]:
    return {m.name: m.update(acc[m.name], s) for m in metrics}


def results(metrics: Sequence[Metric], acc: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{prefix + name: value}``. When no example was counted (every step of an interval skipped as non-finite),
    every metric is NaN: nothing was measured, and 0.0 would read as a perfect loss or a failed model."""
    counted = np.asarray(acc["loss"]["count"]) > 0 if "loss" in acc else True
    return {prefix + m.name: m.result(acc[m.name]) if counted else float("nan") for m in metrics}


# The kinds of labels each task can train on (finetune.training.tasks.kind), hence its default metrics.
_FAMILIES = {
    "text-classification": ("single", "multi", "regression"),
    "image-classification": ("single", "multi", "regression"),
    "token-classification": ("token",),
    "causal-lm": ("lm",),
}


def check_monitor(monitor: str, task: str, metrics: Sequence[Any], *, validation: bool) -> None:
    """Refuses a `fit(monitor=...)` that is not an epoch metric of the run (a typo would keep no best checkpoint)."""
    if metrics:
        names = [m.name for m in resolve(metrics)]
    else:
        defaults = DEFAULT_METRICS
        families = _FAMILIES.get(task, tuple(defaults))
        names = list(dict.fromkeys(["loss", *(n for f in families for n in defaults[f])]))
    available = names + [f"val_{n}" for n in names if validation]
    if monitor in available:
        return
    hint = "" if validation else " (val_ metrics need validation_data)"
    raise ConfigError(
        f"`monitor` must be an epoch metric of this run: {', '.join(available)}{hint}; received monitor={monitor!r}"
        f"{violations.close_names(monitor, [f'val_{n}' for n in names] + names)}. Monitor one of these."
    )
