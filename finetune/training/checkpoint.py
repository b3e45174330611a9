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

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import filelock
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

from finetune.errors import CheckpointError, ConfigError, LoadError
from finetune.writer import CHECKPOINT_LOCK

logger = logging.getLogger(__name__)
_OWNER = ".finetune.owner"  # who holds the lock: pid and host, for the message a second run gets
_TMP = "*.orbax-checkpoint-tmp*"  # Orbax's directories of writes in progress


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


def data_record(source: Any, batch_size: int) -> dict:
    """What identifies a run's training data: its size, a fingerprint of its contents, and the batch size.

    The fingerprint hashes every column and token sequence as finetune holds them (names, dtypes, shapes and bytes;
    for columns read lazily from a `datasets.Dataset`, 16 rows spread over it); ready batches (an iterable) get none,
    since reading them would consume or re-run them.
    """
    return {"size": getattr(source, "size", None), "fingerprint": _data_fingerprint(source), "batch_size": batch_size}


_SAMPLED = 16  # rows hashed of a lazily read column


def _data_fingerprint(source: Any) -> str | None:
    columns = getattr(source, "columns", None)
    if columns is None:
        return None
    digest = hashlib.blake2b(digest_size=16)
    arrays = [
        # columns read lazily from a datasets.Dataset (processed images): a sample of rows, not the whole column
        (k, v[np.linspace(0, len(v) - 1, min(len(v), _SAMPLED)).astype(int)] if hasattr(v, "dataset_column") else v)
        for k, v in sorted(columns.items())
    ]
    arrays = [(k, np.asarray(v)) for k, v in arrays]
    arrays += [
        (f"{k}/{part}", a)
        for k, pair in sorted(getattr(source, "sequences", {}).items())
        for part, a in zip(("values", "offsets"), pair, strict=True)
    ]
    for name, array in arrays:
        digest.update(f"{name}:{array.dtype}:{array.shape};".encode())
        if array.dtype == object:  # pointers otherwise: hash the values
            digest.update(repr(array.tolist()).encode())
        else:
            digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def data_changes(saved: dict | None, current: dict | None) -> list[str]:
    """How the data of a resumed run differs from the checkpointed run's (nothing to compare for old checkpoints)."""
    if not saved or not current:
        return []
    names = {"batch_size": "`batch_size`", "size": "the number of examples", "fingerprint": "the data's fingerprint"}
    return [
        f"{label} {saved[key]!r} -> {current[key]!r}"
        for key, label in names.items()
        if saved.get(key) is not None and current.get(key) is not None and saved[key] != current[key]
    ]


class Checkpointer:
    """An Orbax `CheckpointManager` for training states, keeping the last ``keep`` and the best by ``monitor``.

    Args:
      directory: Where checkpoints go (one sub-directory per step).
      keep: How many of the most recent checkpoints to keep.
      monitor: An epoch log key (e.g. ``"val_loss"``); the best checkpoint by it is kept as well.
      mode: ``"min"``, ``"max"`` or ``"auto"`` (max for accuracy/f1/precision/recall).
      lock: Take the directory's lock (a training run writing there); a `CheckpointError` when another process holds
        it, or when the directory cannot be written (checked here, before any training).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int = 3,
        monitor: str | None = None,
        mode: str = "auto",
        lock: bool = False,
    ):
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
        self._lock = _lock(directory) if lock else None
        self._failed = False
        try:
            self.manager = ocp.CheckpointManager(directory, options=options)
        except BaseException:
            self.release()
            raise

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
        except (OSError, ValueError) as e:  # TensorStore reports a full disk as ValueError (RESOURCE_EXHAUSTED)
            raise self._write_error(step, e) from e

    def _write_error(self, step: int | str, error: BaseException) -> CheckpointError:
        """The error of a failed write, once the writes in flight ended and their temporary directories are gone."""
        self._failed = True
        with contextlib.suppress(Exception):
            self.manager.wait_until_finished()
        self._clean_tmp()
        with contextlib.suppress(Exception):
            self.manager.reload()
        previous = self.latest()
        kept = (
            f"The previous checkpoint (step {previous}) is intact" if previous is not None else "No checkpoint was lost"
        )
        return CheckpointError(
            f"Could not write checkpoint {step} to `checkpoint_dir`={str(self.directory)!r}: {_reason(error)}. {kept} "
            "(nothing of the failed write was left), and the training state in memory is unchanged. Free disk space "
            "or pass another checkpoint_dir, then fit(..., resume=True)."
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

    def newest_meta(self) -> dict | None:
        """The metadata of the newest step whose metadata reads (None when there is no step)."""
        damaged = []
        for step in sorted(self.steps(), reverse=True):
            try:
                return read_meta(self.directory, step)
            except (OSError, ValueError, KeyError) as e:
                damaged.append(f"step {step} ({_reason(e)})")
        if damaged:
            raise self._none_intact(damaged)
        return None

    def restore_intact(self, meta: dict, like: Any, *, accept: Any) -> tuple[Any, dict]:
        """``(state, meta)`` of step ``meta["step"]``, else of the newest older step whose metadata ``accept`` takes.

        Steps whose files are damaged (truncated arrays, missing metadata) are skipped with a warning and removed, so
        the resumed run can write those steps again; a `CheckpointError` when no step is intact.
        """
        damaged = [f"step {s} (its metadata cannot be read)" for s in self.steps() if s > meta["step"]]
        for step in sorted((s for s in self.steps() if s <= meta["step"]), reverse=True):
            try:
                found = meta if step == meta["step"] else read_meta(self.directory, step)
                if not accept(found):
                    break
                state, _ = self.restore(step, like)
            except Exception as e:  # noqa: BLE001 -- TensorStore and Orbax raise plain Exception / ValueError
                damaged.append(f"step {step} ({_reason(e)})")
                continue
            if damaged:
                logger.warning(
                    "Resuming from checkpoint step %d in %r: skipped the damaged %s, now removed.",
                    step,
                    str(self.directory),
                    ", ".join(damaged),
                )
                for newer in (s for s in self.steps() if s > step):
                    self.manager.delete(newer)
            return state, found
        raise self._none_intact(damaged)

    def _none_intact(self, damaged: list[str]) -> CheckpointError:
        return CheckpointError(
            f"Cannot resume from `checkpoint_dir`={str(self.directory)!r}: no checkpoint of this run (phase) is "
            f"intact; damaged: {', '.join(damaged)}. Start without resume (in a new checkpoint_dir), or restore the "
            "directory from a backup."
        )

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except (OSError, ValueError) as e:  # a background write failed
            raise self._write_error("in progress", e) from e

    def close(self) -> None:
        """Waits for the writes in flight, then releases the directory (a failed write was reported already)."""
        try:
            if not self._failed:
                self.wait()
        finally:
            with contextlib.suppress(Exception):
                self.manager.close()
            if self._failed:  # Orbax's background threads have ended now: what they still wrote goes too
                self._clean_tmp()
            self.release()

    def _clean_tmp(self) -> None:
        for tmp in self.directory.glob(_TMP):
            shutil.rmtree(tmp, ignore_errors=True)

    def release(self) -> None:
        """Releases the directory's lock (another run may write there)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def read_meta(directory: str | os.PathLike, step: int | None = None) -> dict:
    """The JSON metadata of a checkpoint without restoring arrays."""
    manager = ocp.CheckpointManager(Path(directory).absolute(), options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise LoadError(f"{str(directory)!r} holds no complete checkpoint.")
    path = Path(directory).absolute() / str(step) / "meta" / "metadata"
    return json.loads(path.read_text())


def _reason(error: BaseException) -> str:
    """The first line of an error, shortened (TensorStore's messages carry kilobytes of specification)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _lock(directory: Path) -> filelock.BaseFileLock | None:
    """Creates ``directory`` and takes its lock (process 0 only: the other hosts of a run write into it too).

    The lock is the OS's (``flock``), so it ends with the process that holds it: a killed run's lock is free again.
    """
    if jax.process_index() != 0:
        return None
    lock = filelock.FileLock(directory / CHECKPOINT_LOCK, timeout=0)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except filelock.Timeout:
        owner = _read_owner(directory)
        raise CheckpointError(
            f"`checkpoint_dir`={str(directory)!r} is in use by another training run ({owner}), which holds its lock. "
            "Two runs writing one directory would overwrite each other's checkpoints. Wait for that run to end, or "
            "pass another checkpoint_dir."
        ) from None
    except OSError as e:
        raise _unwritable(directory, e) from e
    try:
        (directory / _OWNER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    except OSError as e:
        lock.release()
        raise _unwritable(directory, e) from e
    return lock


def _unwritable(directory: Path, error: OSError) -> CheckpointError:
    return CheckpointError(
        f"`checkpoint_dir`={str(directory)!r} cannot be written: {error.strerror or error}. Nothing was trained or "
        "written. Pass a checkpoint_dir on a writable disk."
    )


def _read_owner(directory: Path) -> str:
    try:
        owner = json.loads((directory / _OWNER).read_text())
        return f"process {owner['pid']} on host {owner['host']!r}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that did not record its id"
