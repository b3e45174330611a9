"""Callbacks: small hooks into `fit`, and the built-ins (early stopping, JSONL/CSV logging, LR logging).

Hooks receive ``logs`` dicts of host floats. ``on_step_end`` runs at every log interval (``log_every`` steps), not at
every step, so that no callback forces a device sync per step. Any callback can stop training by setting
``self.trainer.stop_training = True``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Annotated, Any, Literal

import pydantic

from finetune import schema
from finetune.errors import ConfigError

Mode = Annotated[Literal["auto", "min", "max"], schema.allowed("'auto', 'min' or 'max'", "Write e.g. mode='max'.")]


class Callback:
    """Base class: override the hooks you need. ``self.trainer`` is set before ``on_train_begin``."""

    trainer: Any = None

    def on_train_begin(self, logs: dict | None = None) -> None: ...
    def on_train_end(self, logs: dict | None = None) -> None: ...
    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None: ...
    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None: ...
    def on_step_end(self, step: int, logs: dict | None = None) -> None: ...


class EarlyStopping(Callback):
    """Stops training when ``monitor`` has not improved for ``patience`` epochs.

    Args:
      monitor: A key of the epoch logs, e.g. ``"val_loss"`` or ``"val_accuracy"``.
      patience: Epochs without improvement before stopping.
      mode: ``"min"``, ``"max"``, or ``"auto"`` (max for accuracy/f1/precision/recall, else min).
      min_delta: The smallest change that counts as an improvement.
      restore_best_weights: At the end, put back the parameters of the best epoch.
    """

    @schema.arguments
    def __init__(
        self,
        monitor: schema.Text = "val_loss",
        *,
        patience: schema.Index = 0,
        mode: Mode = "auto",
        min_delta: schema.NonNegative = 0.0,
        restore_best_weights: schema.Flag = False,
    ):
        if mode == "auto":
            mode = "max" if any(k in monitor for k in ("acc", "f1", "precision", "recall")) else "min"
        self.monitor, self.patience, self.mode, self.min_delta = monitor, patience, mode, abs(min_delta)
        self.restore_best_weights = restore_best_weights
        self.best, self.best_epoch, self.best_weights, self.wait, self.stopped_epoch = None, None, None, 0, None

    def _improved(self, value: float) -> bool:
        if not math.isfinite(value):  # an epoch whose steps were all skipped measured nothing: never an improvement
            return False
        if self.best is None:
            return True
        return value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            available = ", ".join(sorted(logs or {}))
            raise ConfigError(
                f"EarlyStopping's `monitor` is {self.monitor!r}, which the epoch logs lack. Available: {available}. "
                "Monitor one of these (val_ metrics need validation_data)."
            )
        if self._improved(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:
                self.best_weights = self.trainer.get_weights()
            return
        self.wait += 1
        if self.wait > self.patience - 1 + (self.patience == 0):
            self.stopped_epoch = epoch
            self.trainer.stop_training = True

    def on_train_end(self, logs=None):
        if self.restore_best_weights and self.best_weights is not None:
            self.trainer.set_weights(self.best_weights)


class JSONLLogger(Callback):
    """Appends one JSON line per log interval (``"kind": "step"``) and per epoch (``"kind": "epoch"``)."""

    @schema.arguments
    def __init__(self, path: schema.Path):
        self.path = os.fspath(path)

    def _write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")

    def on_step_end(self, step, logs=None):
        self._write({"kind": "step", "step": step, **(logs or {})})

    def on_epoch_end(self, epoch, logs=None):
        self._write({"kind": "epoch", "epoch": epoch, **(logs or {})})


class CSVLogger(Callback):
    """Writes one CSV row per epoch (Keras' CSVLogger): ``epoch`` and every epoch log."""

    @schema.arguments
    def __init__(self, path: schema.Path):
        self.path = os.fspath(path)
        self.rows: list[dict[str, Any]] = []

    def on_epoch_end(self, epoch, logs=None):
        self.rows.append({"epoch": epoch, **(logs or {})})
        fields = list(dict.fromkeys(k for row in self.rows for k in row))
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)


class LearningRateLogger(Callback):
    """Records the learning rate of every group at every log interval: ``self.records = [{"step", group: lr}]``."""

    def __init__(self):
        self.records: list[dict[str, float]] = []

    def on_step_end(self, step, logs=None):
        lrs = {k[3:]: v for k, v in (logs or {}).items() if k.startswith("lr/")}
        self.records.append({"step": step, **lrs})


def _callbacks(value: Any) -> list:
    items = [value] if isinstance(value, Callback) else value
    if isinstance(items, list | tuple) and all(isinstance(cb, Callback) for cb in items):
        return list(items)
    bad = (
        next((cb for cb in items if not isinstance(cb, Callback)), items) if isinstance(items, list | tuple) else items
    )
    raise schema.violation(
        f"a finetune.callbacks.Callback or a list of them (received an item of type {type(bad).__name__})",
        "Subclass finetune.callbacks.Callback (override the hooks you need), or pass one of the built-in callbacks.",
    )


# `fit(callbacks=...)`: one callback or a list of them, each a `Callback`.
Callbacks = Annotated[Any, pydantic.AfterValidator(_callbacks)]
