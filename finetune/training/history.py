"""`History`: what `fit` returns, like Keras' (``.history`` holds one list per epoch metric)."""

from __future__ import annotations

import copy
import os
from typing import Any


class History:
    """Per-epoch logs (``.history``: ``{"loss": [...], "val_accuracy": [...]}``) and step logs (``.steps``)."""

    def __init__(self):
        self.history: dict[str, list[float]] = {}
        self.epochs: list[int] = []
        self.steps: list[dict[str, Any]] = []
        self.compiled_shapes: list[tuple] = []  # batch shapes the train step was compiled for
        self.compilations: list[int] = []  # compilations of the train step, one entry per phase

    def add_step(self, step: int, logs: dict[str, Any]) -> None:
        self.steps.append({"step": step, **logs})

    def add_epoch(self, epoch: int, logs: dict[str, float]) -> None:
        self.epochs.append(epoch)
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)

    def to_dict(self) -> dict[str, Any]:
        """A copy of the record as plain dicts and lists (checkpoints write it in the background, while the run goes on
        appending to the live record)."""
        return copy.deepcopy({"history": self.history, "epochs": self.epochs, "steps": self.steps})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        history = cls()
        history.history = {k: list(v) for k, v in data.get("history", {}).items()}
        history.epochs, history.steps = list(data.get("epochs", [])), list(data.get("steps", []))
        return history

    def plot(self, path: str | os.PathLike | None = None, *, keys: list[str] | None = None):
        """Training curves: the step losses, and every epoch metric with its ``val_`` twin. Saves to ``path``.

        Needs matplotlib (``pip install 'finetune[plot]'``). Returns the matplotlib figure.
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("History.plot needs matplotlib: pip install 'finetune[plot]'.") from e
        names = keys or sorted({k.removeprefix("val_") for k in self.history})
        fig, axes = plt.subplots(1, 1 + len(names), figsize=(4 * (1 + len(names)), 3.2), squeeze=False)
        ax = axes[0, 0]
        ax.plot([s["step"] for s in self.steps], [s.get("loss") for s in self.steps], label="train loss")
        ax.set_xlabel("step"), ax.set_title("loss per log interval"), ax.legend()
        for ax, name in zip(axes[0, 1:], names, strict=True):
            for key in (name, "val_" + name):
                if key in self.history:
                    ax.plot(self.epochs, self.history[key], marker="o", label=key)
            ax.set_xlabel("epoch"), ax.set_title(name), ax.legend()
        fig.tight_layout()
        if path is not None:
            fig.savefig(os.fspath(path), dpi=100)
        return fig
