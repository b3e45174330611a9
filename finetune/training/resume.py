"""The checkpoints of one `fit`: the locked directory, what identifies the run, and exact resumption.

`Checkpoints` opens (locks) the directory, reads the metadata of the checkpoint to resume from, saves the training
state with what the next step depends on (phase, epoch, batch position, recipe, packing, data, history), and restores
it after checking that the model, the recipe and the data are those of the checkpointed run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from finetune.errors import CheckpointError, ConfigError, LoadError
from finetune.training.checkpoint import Checkpointer, data_changes, data_record, fingerprint
from finetune.training.history import History

logger = logging.getLogger(__name__)

# Fields that may change between a run and its resumption without changing what the next step computes.
RESUMABLE_CHANGES = {"epochs", "steps", "log_every", "steps_per_execution", "description", "provenance", "name"}

# Recipe fields added after checkpoints were first written, with the behaviour of runs from before them.
FIELDS_BEFORE_THEY_EXISTED = {"remat": False, "group_by_length": False}


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
    """What `finetune.Model.fit` was asked about checkpoints.

    Attributes:
      directory: ``checkpoint_dir``: Orbax checkpoints go here (each epoch, and every ``save_every`` steps). The run
        locks it: a second run into the same directory is refused at start (`CheckpointError`), as is a directory
        that cannot be written.
      save_every: Also checkpoint every this many steps (micro-batches).
      save_each_epoch: Checkpoint at the end of every epoch.
      keep: Keep the last ``keep`` checkpoints, and the best by ``monitor`` (an epoch metric, e.g. ``val_accuracy``).
      resume: True continues from the latest checkpoint in ``directory`` when there is one; a path continues from
        the checkpoints there. The resumed run ends with the same parameters as an uninterrupted one. A newest
        checkpoint whose files are damaged is skipped (with a warning) for the newest intact one. Resuming with
        other training data (its size or contents) or another ``batch_size`` than the checkpointed run's is refused
        with a `CheckpointError` naming the change, unless ``allow_changed_data``.
      allow_changed_data: With ``resume``, continue from the checkpoint even though the data or ``batch_size``
        differ from the checkpointed run's: the rest of the epoch starts after as many examples as that run had
        seen in it (the result then differs from an uninterrupted run).
    """

    directory: Any = None
    save_every: int | None = None
    save_each_epoch: bool = True
    keep: int = 3
    monitor: str | None = None
    resume: Any = False
    allow_changed_data: bool = False  # resume although the data or batch size differ from the checkpoint's


@dataclasses.dataclass(frozen=True)
class Position:
    """Where a checkpoint sits in training: the phase, the epoch, the batch within it, micro-steps done in the
    phase, and the global step."""

    phase: int
    epoch: int
    batch: int
    done: int
    step: int


def with_packing(recipe: dict, pack: bool) -> dict:
    """``recipe`` with ``packing`` as the run applies it: ``None`` (the default) packs or not as the run did
    (``pack``: the checkpoint's ``packed``, or for checkpoints from before that record, as this run does). So a
    checkpoint written before the default (``False``) resumes wherever nothing is packed, and a resumed run with
    ``packing=None`` keeps the layout its checkpoint recorded; an explicit ``packing`` that differs from that layout
    is refused, naming ``packing``."""
    packing = recipe.get("packing", False)
    return {**recipe, "packing": pack if packing is None else bool(packing)}


def recipe_changes(saved: dict, current: dict) -> list[str]:
    """The recipe fields that differ between a checkpoint's recipe and this run's and change what it computes."""
    saved = {**FIELDS_BEFORE_THEY_EXISTED, **saved}
    return sorted(k for k in set(saved) | set(current) if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))


class Checkpoints:
    """The checkpoint directory of one `fit`, locked from opening to `release`.

    Opening records what identifies the training data (`finetune.training.checkpoint.data_record`) and reads the
    metadata of the checkpoint to resume from (`meta`; None: start fresh). A second run into the directory is
    refused here.
    """

    def __init__(self, options: CheckpointOptions, source: Any, batch_size: int):
        self.options = options
        self.checkpointer = Checkpointer(options.directory, keep=options.keep, monitor=options.monitor, lock=True)
        try:
            self.data = data_record(source, batch_size)
            self.meta = self._resume_meta()
            self.recorded_packed = self.meta.get("packed") if self.meta is not None else None
        except BaseException:
            self.checkpointer.release()
            raise

    def _resume_meta(self) -> dict | None:
        resume = self.options.resume
        if not resume:
            return None
        if resume is not True:
            if os.path.abspath(resume) != os.path.abspath(self.options.directory):
                self.checkpointer.release()  # the run writes where it resumes from
                opts = self.options
                self.checkpointer = Checkpointer(resume, keep=opts.keep, monitor=opts.monitor, lock=True)
            if self.checkpointer.latest() is None:
                raise LoadError(
                    f"`resume`={str(resume)!r} holds no complete checkpoint to resume from. Pass the checkpoint_dir "
                    "of an earlier run, or resume=True to continue only when a checkpoint exists."
                )
        return self.checkpointer.newest_meta()

    def wait(self) -> None:
        """Waits for the checkpoint being written in the background."""
        self.checkpointer.wait()

    def close(self) -> None:
        self.checkpointer.close()

    def release(self) -> None:
        """Unlocks the directory."""
        self.checkpointer.release()

    def save(self, at: Position, state: Any, *, recipe: Any, packed: bool, history: History, metrics: Any = None):
        """Writes ``state`` as the checkpoint of step ``at.step`` (once: an interrupt right after a periodic save
        writes nothing more)."""
        if self.checkpointer.latest() == at.step:
            return
        meta = {
            **dataclasses.asdict(at),
            "recipe": recipe.to_dict(),
            "packed": packed,  # what `packing=None` meant for this run (the architectures that pack may grow)
            "data": self.data,  # compared on resume: other data or another batch size is another run
            "history": history.to_dict(),
            "fingerprint": fingerprint(state),
        }
        self.checkpointer.save(at.step, state, meta, metrics)

    def check(self, state: Any, recipe: Any, packed: bool) -> list[str]:
        """Refuses to resume another model, recipe or (unless allowed) data; returns the allowed data changes."""
        meta, directory = self.meta, str(self.checkpointer.directory)
        assert meta is not None  # called with a checkpoint to resume from
        if meta["fingerprint"] != fingerprint(state):
            raise ConfigError(
                f"Cannot resume from {directory!r}: it holds a checkpoint of a different model "
                "(other parameter names, shapes or frozen groups). Resume with the same model and recipe, or use a "
                "new checkpoint_dir."
            )
        saved = with_packing(meta["recipe"], meta.get("packed", packed))
        changed = recipe_changes(saved, with_packing(recipe.to_dict(), packed))
        if changed:
            raise ConfigError(
                f"Cannot resume from {directory!r}: the recipe differs in {', '.join(changed)}. "
                "Resume with the recipe of the checkpointed run, or start a new checkpoint_dir."
            )
        changes = data_changes(meta.get("data"), self.data)
        if changes and not self.options.allow_changed_data:
            raise CheckpointError(
                f"Cannot resume from `checkpoint_dir`={directory!r}: the checkpointed run "
                f"trained on other data ({'; '.join(changes)}), so this would not continue that run. Pass the data and "
                "batch_size of that run; or fit(..., allow_changed_data=True) to continue from the checkpoint on this "
                "data; or start a new checkpoint_dir."
            )
        return changes

    def restore(self, state: Any, *, recipe: Any, packed: bool, batch_size: int, steps_per_epoch: int | None):
        """Loads the checkpoint to resume from into the freshly built ``state``.

        Returns ``(state, position, history)``: ``history`` is the restored checkpoint's when the newest one was
        damaged and an older one restored, else None. A recipe's ``packing=None`` means what each run did with it:
        ``packed`` here, the checkpoint's ``packed`` there."""
        changes = self.check(state, recipe, packed)
        wanted = self.meta
        assert wanted is not None  # checked above
        state, meta = self.checkpointer.restore_intact(wanted, state, accept=lambda m: m["phase"] == wanted["phase"])
        history = History.from_dict(meta["history"]) if meta["step"] != wanted["step"] else None
        self.meta = None
        epoch, batch = meta["epoch"], meta["batch"]
        if changes:  # allowed: continue after the examples the checkpointed run had seen in its epoch
            logger.warning("Resuming on changed data (%s), as allow_changed_data=True asks.", "; ".join(changes))
            batch = batch * meta["data"]["batch_size"] // batch_size
            if batch >= (steps_per_epoch or batch + 1):
                epoch, batch = epoch + 1, 0
        return state, Position(meta["phase"], epoch, batch, meta["done"], meta["step"]), history
