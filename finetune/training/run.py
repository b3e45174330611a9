"""The state of one `fit` call: what was asked (`FitOptions`, frozen), how far it has come (`Progress`), and the
length of each phase (`Span`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from finetune.errors import ConfigError
from finetune.training import signals
from finetune.training.callbacks import Callback
from finetune.training.history import History
from finetune.training.resume import CheckpointOptions, Checkpoints
from finetune.training.stacking import Stacking


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """What one `fit` call was asked: its data (as sources), batch size, callbacks, verbosity and checkpoints."""

    source: Any
    batch_size: int
    validation_data: Any = None
    callbacks: Sequence[Callback] = ()
    verbose: int = 1
    checkpoints: CheckpointOptions = CheckpointOptions()


@dataclasses.dataclass
class Progress:
    """How far one `fit` call has come, across its phases."""

    epoch: int = 0
    step: int = 0
    history: History = dataclasses.field(default_factory=History)
    packed: bool = False  # whether the current phase packs its training batches (`feed.packs`)


@dataclasses.dataclass
class Fit:
    """One `fit` call: what was asked, how far it is, its checkpoints, steps per call and deferred interrupts."""

    options: FitOptions
    progress: Progress
    checkpoints: Checkpoints | None
    stacking: Stacking
    interrupts: signals.Interrupts = dataclasses.field(default_factory=signals.Interrupts)


@dataclasses.dataclass(frozen=True)
class Span:
    """The length of a phase: batches per epoch (None: unknown), micro-steps in all, and epochs."""

    per_epoch: int | None
    total: int
    epochs: int


def span(per_epoch: int | None, accumulate: int, epochs: int, steps: int | None) -> Span:
    """A phase of ``epochs`` over ``per_epoch`` batches, or of ``steps`` optimizer steps (each ``accumulate``
    micro-batches) when given."""
    total = steps * accumulate if steps else (epochs * per_epoch if per_epoch else None)
    if total is None:
        raise ConfigError("The training data has no length; pass `steps` so fit knows when to stop.")
    if per_epoch and not steps and epochs * per_epoch < accumulate:
        raise ConfigError(f"Training is {epochs * per_epoch} micro-batches, fewer than `accumulate`={accumulate}.")
    epochs = epochs if not steps else (-(-total // per_epoch) if per_epoch else 1 << 30)
    return Span(per_epoch, total, epochs)
