"""Data in, fixed-shape batches out: arrays or ready batches -> shuffled, padded, masked batches on device.

Every batch has the same leading size: the last partial batch is padded with zero rows whose ``example_mask`` is 0,
so it is neither dropped nor recompiled, and padding never counts in the loss or metrics. Batches are prepared on a
background thread and put on device ahead of the step that needs them.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from finetune.errors import DataError

Batch = dict[str, np.ndarray]


def _x_key(task: str, x: np.ndarray) -> str:
    if task == "image-classification":
        return "pixel_values"
    if np.issubdtype(x.dtype, np.integer) and x.ndim == 2:
        return "input_ids"
    return "x"


class ArrayData:
    """A data set held as equal-length numpy columns (``labels`` included).

    Args:
      columns: ``{name: array}`` with the same first dimension.
    """

    def __init__(self, columns: Mapping[str, Any]):
        self.columns = {k: np.asarray(v) for k, v in columns.items()}
        sizes = {k: len(v) for k, v in self.columns.items()}
        if len(set(sizes.values())) > 1:
            raise DataError(f"All data columns must have the same length; received lengths {sizes}.")
        self.size = next(iter(sizes.values()), 0)
        if self.size == 0:
            raise DataError("The data set is empty (0 examples). Pass a data set with at least one example.")

    def __len__(self) -> int:
        return self.size

    def steps(self, batch_size: int) -> int:
        return -(-self.size // batch_size)

    def batches(self, batch_size: int, *, seed: int | None = 0, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        """The batches of one epoch, from batch ``start`` on, in the order ``(seed, epoch)`` decides.

        ``seed=None`` keeps the data order (evaluation and prediction).
        """
        order = np.arange(self.size) if seed is None else np.random.default_rng([seed, epoch]).permutation(self.size)
        for first in range(start * batch_size, self.size, batch_size):
            index = order[first : first + batch_size]
            batch = {k: v[index] for k, v in self.columns.items()}
            batch["example_mask"] = np.ones(len(index), np.float32)
            yield pad(batch, batch_size)


class BatchIterable:
    """Ready batches (an iterable of dicts, re-iterated every epoch); partial batches get padded and masked."""

    def __init__(self, batches: Iterable[Mapping[str, Any]]):
        self.source = batches
        self.size = None

    def steps(self, batch_size: int) -> int | None:
        return len(self.source) if hasattr(self.source, "__len__") else None

    def batches(self, batch_size: int, *, seed: int | None = 0, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        for i, b in enumerate(self.source):
            if i < start:
                continue
            batch = {k: np.asarray(v) for k, v in b.items()}
            n = len(next(iter(batch.values())))
            batch.setdefault("example_mask", np.ones(n, np.float32))
            yield pad(batch, max(batch_size, n))


def pad(batch: Batch, size: int) -> Batch:
    """Pads every column to ``size`` rows with zeros (``example_mask`` 0 on the added rows)."""
    n = len(batch["example_mask"])
    if n == size:
        return batch
    return {k: np.concatenate([v, np.zeros((size - n, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}


def as_source(data: Any, *, task: str) -> ArrayData | BatchIterable:
    """Wraps what the user passed: a dict of arrays, ``(x, y)`` arrays, or an iterable of ready batches."""
    if isinstance(data, ArrayData | BatchIterable):
        return data
    if isinstance(data, Mapping):
        return ArrayData(data)
    if isinstance(data, tuple) and len(data) == 2:
        x, y = data
        columns = dict(x) if isinstance(x, Mapping) else {_x_key(task, np.asarray(x)): x}
        return ArrayData({**columns, "labels": y})
    if isinstance(data, Iterable) and not isinstance(data, str | bytes | np.ndarray):
        return BatchIterable(data)
    raise DataError(
        f"Cannot make batches from data of type {type(data).__name__}. Pass a dict of numpy arrays (with a "
        "`labels` column), an (x, y) pair of arrays, or an iterable of ready batches (dicts of arrays)."
    )


def prefetch(batches: Iterator[Batch], *, size: int = 2, sharding: Any = None) -> Iterator[dict[str, jax.Array]]:
    """Moves batches to device on a background thread, ``size`` ahead of the consumer."""
    q: queue.Queue = queue.Queue(maxsize=size)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for batch in batches:
                item = jax.device_put(batch, sharding) if sharding is not None else jax.device_put(batch)
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # surfaced in the consumer's thread
            q.put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
