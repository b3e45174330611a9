"""Orbax checkpoints of a training run: save every N steps / each epoch, keep the last K and the best, resume exactly.

A checkpoint holds everything that decides the next step: parameters, frozen parameters, RNG and other module state,
the optimizer state (schedule counts included), and as JSON the step, phase, epoch and batch position of the data, the
resolved recipe, the history so far, and a fingerprint of the model. Orbax writes each checkpoint to a temporary
directory and renames it when complete, so a crash mid-write leaves the previous checkpoint restorable; writes run in
the background (the state is first copied to host memory, so training goes on while the files are written).

Example:
  >>> model.fit(train, epochs=3, checkpoint_dir="runs/ckpt", save_every=100)
  >>> model.fit(train, epochs=3, checkpoint_dir="runs/ckpt", resume=True)   # after a crash: continues exactly
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

from finetune.errors import CheckpointError, ConfigError, LoadError


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_saveable(state: Any) -> Any:
    """Copies of every array that later buffer donation cannot touch (typed PRNG keys as their raw key data).

    Arrays this process holds entirely become numpy host copies. Arrays spread over several processes stay jax arrays
    (copied on device): Orbax writes each process's own shards, so every process takes part in the save.
    """

    def copy(x):
        x = jax.random.key_data(x) if _is_key(x) else x
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jnp.copy(x)
        return np.asarray(x)

    return jax.tree.map(copy, state)


def _target(ref: Any) -> Any:
    """What Orbax restores a leaf as: an array already in ``ref``'s sharding, or a numpy array."""
    if not isinstance(ref, jax.Array):
        return np.zeros(np.shape(ref), np.asarray(ref).dtype)
    shape, dtype = (jax.random.key_data(ref).shape, np.uint32) if _is_key(ref) else (ref.shape, ref.dtype)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=ref.sharding)


def from_saveable(saved: Any, like: Any) -> Any:
    """Puts restored arrays back in the structure, dtypes and shardings of ``like`` (PRNG keys re-wrapped).

    A checkpoint written on one device restores onto a mesh and the other way round: the arrays take ``like``'s
    shardings, whatever the run that wrote them used.
    """

    def put(value, ref):
        sharding = getattr(ref, "sharding", None)
        if not isinstance(value, jax.Array):
            value = jax.device_put(np.asarray(value), sharding)
        elif sharding is not None and value.sharding != sharding:
            value = jax.device_put(value, sharding)
        if _is_key(ref):
            return jax.random.wrap_key_data(value, impl=jax.random.key_impl(ref))
        return value if value.dtype == ref.dtype else value.astype(ref.dtype)

    return jax.tree.map(put, saved, like)


def fingerprint(state: Any) -> str:
    """A hash of the parameter paths, shapes and dtypes: two checkpoints of the same model share it."""
    leaves = jax.tree_util.tree_flatten_with_path({"params": state["params"], "frozen": state["frozen"]})[0]
    text = ";".join(f"{jax.tree_util.keystr(p)}:{tuple(np.shape(x))}:{x.dtype}" for p, x in leaves)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Checkpointer:
    """An Orbax `CheckpointManager` for training states, keeping the last ``keep`` and the best by ``monitor``.

    Args:
      directory: Where checkpoints go (one sub-directory per step).
      keep: How many of the most recent checkpoints to keep.
      monitor: An epoch log key (e.g. ``"val_loss"``); the best checkpoint by it is kept as well.
      mode: ``"min"``, ``"max"`` or ``"auto"`` (max for accuracy/f1/precision/recall).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, monitor: str | None = None, mode: str = "auto"):
        directory = Path(directory).absolute()
        if directory.exists() and not directory.is_dir():
            raise ConfigError(
                f"`checkpoint_dir` {str(directory)!r} is a file. Pass a directory (it is created if missing)."
            )
        if not isinstance(keep, int) or keep < 1:
            raise ConfigError(f"`keep` must be an int >= 1 (checkpoints kept); received keep={keep!r}.")
        if mode == "auto":
            mode = "max" if monitor and any(k in monitor for k in ("acc", "f1", "precision", "recall")) else "min"
        keep_policies = [policies.LatestN(n=keep)]
        if monitor:
            keep_policies.append(
                policies.BestN(
                    get_metric_fn=lambda m: m[monitor],
                    reverse=mode == "max",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep_policies),
            enable_async_checkpointing=True,
            cleanup_tmp_directories=True,
        )
        self.directory, self.monitor = directory, monitor
        self.manager = ocp.CheckpointManager(directory, options=options)

    def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None) -> None:
        """Starts writing checkpoint ``step`` in the background (returns once the state is copied to host)."""
        metrics = {k: float(v) for k, v in (metrics or {}).items()} if self.monitor else None
        if metrics is not None and self.monitor not in metrics:
            metrics = None
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(to_saveable(state)), meta=ocp.args.JsonSave(meta)),
                metrics=metrics,
                force=True,
            )
        except OSError as e:
            raise self._write_error(step, e) from e

    def _write_error(self, step: int | str, error: BaseException) -> CheckpointError:
        previous = self.latest()
        kept = (
            f"The previous checkpoint (step {previous}) is intact" if previous is not None else "No checkpoint was lost"
        )
        return CheckpointError(
            f"Could not write checkpoint {step} to {str(self.directory)!r}: {error}. {kept}, and the training state in "
            "memory is unchanged. Free disk space or pass another checkpoint_dir, then fit(..., resume=True)."
        )

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def best(self) -> int | None:
        return self.manager.best_step() if self.monitor else None

    def restore(self, step: int | None, like: Any) -> tuple[Any, dict]:
        """``(state, meta)`` of checkpoint ``step`` (latest when None), shaped and placed like ``like``."""
        step = self.latest() if step is None else step
        if step is None:
            raise LoadError(
                f"`resume` was requested, but {str(self.directory)!r} holds no complete checkpoint. Start without "
                "resume=, or point checkpoint_dir at the run to continue."
            )
        abstract = jax.tree.map(_target, like)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        return from_saveable(restored["state"], like), restored["meta"]

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except OSError as e:  # a background write failed
            raise self._write_error("in progress", e) from e

    def close(self) -> None:
        self.wait()
        self.manager.close()


def read_meta(directory: str | os.PathLike, step: int | None = None) -> dict:
    """The JSON metadata of a checkpoint without restoring arrays."""
    manager = ocp.CheckpointManager(Path(directory).absolute(), options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise LoadError(f"{str(directory)!r} holds no complete checkpoint.")
    path = Path(directory).absolute() / str(step) / "meta" / "metadata"
    return json.loads(path.read_text())
