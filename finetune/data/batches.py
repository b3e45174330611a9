"""Prepared columns -> batches: shuffled, grouped by length, padded to a length bucket or packed, masked.

The fifth stage of the data's path (`finetune.data.pipeline`): an `ArrayData` holds a data set as numpy columns and
ragged token sequences and cuts the batches of every epoch from them; a `BatchIterable` passes ready batches on,
padded and masked. Every batch has the same number of rows: the last partial batch is padded with rows whose
``example_mask`` is 0, so it is neither dropped nor recompiled, and padding (rows and tokens) never counts in the loss
or the metrics.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from typing import Any

import numpy as np

from finetune.data.buckets import fitted_buckets
from finetune.data.check import model_inputs
from finetune.errors import DataError

Batch = dict[str, np.ndarray]


class ArrayData:
    """A data set held as numpy columns: fixed-shape ``columns`` and ragged token ``sequences``.

    Args:
      columns: ``{name: array}`` with the same first dimension (``labels``, ``pixel_values``, dense ``input_ids``...).
        An array-like with ``__len__`` and integer-array indexing (e.g. a `datasets` column) also works.
      sequences: ``{name: (values, offsets)}``: example ``i`` is ``values[offsets[i]:offsets[i + 1]]``. Batches pad
        them to a length bucket and add ``attention_mask`` (1 on real tokens).
      buckets: The padded lengths a batch may take (default: `fitted_buckets`); the longest is also the truncation
        limit.
      pad_values: Padding value of each sequence (default 0).

    Example:
      >>> data = ArrayData({"x": np.ones((10, 4)), "labels": np.zeros(10, np.int32)})
      >>> next(data.batches(4, seed=0))["example_mask"]
      array([1., 1., 1., 1.], dtype=float32)
    """

    def __init__(
        self,
        columns: Mapping[str, Any],
        *,
        sequences: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
        buckets: tuple[int, ...] | None = None,
        pad_values: Mapping[str, int] | None = None,
    ):
        self.columns = {k: v if hasattr(v, "dataset_column") else np.asarray(v) for k, v in columns.items()}
        self.sequences = {k: (np.asarray(v), np.asarray(o, np.int64)) for k, (v, o) in (sequences or {}).items()}
        self.pad_values = dict(pad_values or {})
        self.lengths: Any = None  # tokens of each example (within the longest bucket), when there are sequences
        if self.sequences:
            offsets = next(iter(self.sequences.values()))[1]
            lengths = np.diff(offsets)
            self.buckets = tuple(buckets or fitted_buckets(lengths, max(int(lengths.max(initial=1)), 1)))
            self.lengths = np.minimum(lengths, self.buckets[-1])  # longer ones keep their first tokens
        sizes = {k: len(v) for k, v in self.columns.items()} | {k: len(o) - 1 for k, (_, o) in self.sequences.items()}
        if len(set(sizes.values())) > 1:
            raise DataError(f"All data columns must have the same length; received lengths {sizes}.")
        self.size = next(iter(sizes.values()), 0)
        if self.size == 0:
            raise DataError("The data set is empty (0 examples). Pass a data set with at least one example.")
        self.shapes: set[tuple[int, ...]] = set()  # input shapes handed out so far (the compiled shapes)
        self._packed_rows: dict[tuple, int] = {}  # `packed_rows` by (batch size, seed)

    def __len__(self) -> int:
        return self.size

    def view(self) -> ArrayData:
        """The same data (arrays shared, not copied) with its own record of the shapes handed out."""
        other = copy.copy(self)
        other.shapes = set()
        return other

    def steps(self, batch_size: int) -> int:
        """Batches per epoch (the last one may be partial, and is padded)."""
        return -(-self.size // batch_size)

    def batches(
        self,
        batch_size: int,
        *,
        seed: int | None = 0,
        epoch: int = 0,
        start: int = 0,
        group: bool = False,
        pack: bool = False,
    ) -> Iterator[Batch]:
        """The batches of one epoch, from batch ``start`` on, in the order ``(seed, epoch)`` decides.

        ``seed=None`` keeps the data order (evaluation and prediction). The same ``(seed, epoch, start)`` always gives
        the same batches, so a run resumed at a step sees exactly the data it would have seen. ``group`` (with a seed,
        for token sequences) groups examples of similar length into batches, as the Trainer's ``group_by_length``:
        the shuffled data is cut into runs of `GROUP_BATCHES` batches, each run sorted by length and cut into
        batches, and the batches shuffled; batches then pad to a smaller bucket (less compute per example). ``pack``
        (for token sequences; ``group`` is then moot) packs each batch's examples several to a row (`take_packed`):
        one shape for the whole epoch, and about as little padding as grouping gives.
        """
        if pack and self.sequences:
            rows = self.packed_rows(batch_size, seed)
            for index in self._slices(batch_size, seed, epoch, group=False)[start:]:
                batch = self.take_packed(index, rows, batch_size)
                self.shapes.add(_shape(batch))
                yield batch
            return
        for index in self._slices(batch_size, seed, epoch, group)[start:]:
            batch = self.take(index)
            batch["example_mask"] = np.ones(len(index), np.float32)
            batch = pad(batch, batch_size)
            self.shapes.add(_shape(batch))
            yield batch

    def _slices(self, batch_size: int, seed: int | None, epoch: int, group: bool) -> list[np.ndarray]:
        rng = None if seed is None else np.random.default_rng([seed, epoch])
        order = np.arange(self.size) if rng is None else rng.permutation(self.size)
        if group and rng is not None and self.lengths is not None:
            return _grouped_by_length(order, self.lengths, batch_size, rng)
        return [order[first : first + batch_size] for first in range(0, self.size, batch_size)]

    def packed_rows(self, batch_size: int, seed: int | None) -> int:
        """Rows of a packed batch (`take_packed`): the most that a batch of the first epoch needs, so that one shape
        serves all of it. A later epoch's batch that needs more takes more, rounded up to a multiple of 4 (one more
        compiled shape at most every 4 rows); sizing every batch for the worst batch of several epochs would cost
        more (docs/performance.md, finetune/data/batches.py)."""
        key = (batch_size, seed)
        if key not in self._packed_rows:
            width = self.buckets[-1]
            need = [len(first_fit(self.lengths[i], width)[0]) for i in self._slices(batch_size, seed, 0, False)]
            self._packed_rows[key] = max(need, default=1)
        return self._packed_rows[key]

    def take_packed(self, index: np.ndarray, rows: int, batch_size: int) -> Batch:
        """The examples at ``index`` packed several to a row: ``[rows, width]`` token arrays, ``width`` the longest
        bucket, with each example's tokens kept whole in one row (first fit, longest first).

        Besides the sequences (``input_ids``...), the batch has ``segment_ids`` (``[rows, width]``: each token's
        example, numbered from 1 in the batch, 0 on padding; attention stays within a segment), ``position_ids``
        (each example's own positions, from 0), and per example (``[batch_size]``, padded like every per-example
        column) ``example_rows`` and ``example_cols``: where its first token sits. A model that supports packing (its
        ``supports_packing``) computes for each example exactly what it computes unpacked.
        """
        width = self.buckets[-1]
        lengths = self.lengths[index]
        used, where = first_fit(lengths, width)
        if len(used) > rows:
            rows = -(-len(used) // 4) * 4
        row, col = where[:, 0], where[:, 1]
        batch = {k: np.asarray(v[index]) for k, v in self.columns.items()}
        batch["example_mask"] = np.ones(len(index), np.float32)
        batch["example_rows"], batch["example_cols"] = row.astype(np.int32), col.astype(np.int32)
        batch = pad(batch, batch_size)
        token_rows = np.repeat(row, lengths)
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        token_cols = np.repeat(col, lengths) + within
        for name, (values, offsets) in self.sequences.items():
            out = np.full((rows, width), self.pad_values.get(name, 0), values.dtype)
            out[token_rows, token_cols] = values[np.repeat(offsets[index], lengths) + within]
            batch[name] = out
        segment = np.zeros((rows, width), np.int32)
        segment[token_rows, token_cols] = np.repeat(np.arange(1, len(index) + 1, dtype=np.int32), lengths)
        positions = np.zeros((rows, width), np.int32)
        positions[token_rows, token_cols] = within
        batch["segment_ids"], batch["position_ids"] = segment, positions
        return batch

    def take(self, index: np.ndarray) -> Batch:
        """The examples at ``index``; sequences padded to the smallest bucket that holds the longest of them."""
        batch = {k: np.asarray(v[index]) for k, v in self.columns.items()}
        if self.sequences:
            longest = int(self.lengths[index].max(initial=1))
            width = next((b for b in self.buckets if b >= longest), longest)
            mask = np.arange(width) < self.lengths[index][:, None]
            for name, (values, offsets) in self.sequences.items():
                out = np.full((len(index), width), self.pad_values.get(name, 0), values.dtype)
                out[mask] = values[(offsets[index][:, None] + np.arange(width))[mask]]
                batch[name] = out
            batch.setdefault("attention_mask", mask.astype(np.int32))
        return batch


class BatchIterable:
    """Ready batches (an iterable of dicts, re-iterated every epoch); partial batches get padded and masked.

    ``check(batch)`` is called on every batch before it is handed out (`finetune.data.check.check_batch`); an
    iterable that yields no batch at all is a `DataError`, not a bare ``StopIteration``. ``argument`` names the
    argument the iterable was passed as, for messages.
    """

    def __init__(
        self,
        batches: Iterable[Mapping[str, Any]],
        *,
        check: Callable[[Batch], None] | None = None,
        argument: str = "data",
    ):
        self.source = batches
        self.check, self.argument = check, argument
        self.size = None
        self.shapes: set[tuple[int, ...]] = set()

    def steps(self, batch_size: int) -> int | None:
        return len(self.source) if isinstance(self.source, Sized) else None

    def batches(
        self,
        batch_size: int,
        *,
        seed: int | None = 0,
        epoch: int = 0,
        start: int = 0,
        group: bool = False,
        pack: bool = False,
    ) -> Iterator[Batch]:
        del seed, epoch, group, pack  # ready batches keep their order and shapes
        i = -1
        for i, b in enumerate(self.source):
            if i < start:
                continue
            if not isinstance(b, Mapping):
                raise DataError(
                    f"Item {i} of the iterable passed as `{self.argument}` is a {type(b).__name__} ({b!r:.60}), not "
                    "a batch. An iterable is read as ready batches: dicts of arrays such as {'input_ids': ..., "
                    "'labels': ...}. "
                    "For raw examples pass a list of texts, a list of rows ({'text': ..., 'label': ...}), a dict of "
                    "columns or a datasets.Dataset."
                )
            batch = {k: np.asarray(v) for k, v in b.items()}
            if not batch or not len(next(iter(batch.values()))):
                raise DataError(f"`{self.argument}` (batch {i}): The batch is empty. Give every batch rows.")
            if self.check is not None:
                try:
                    self.check(batch)
                except DataError as e:
                    raise DataError(f"`{self.argument}` (batch {i}): {e}") from None
            n = len(next(iter(batch.values())))
            batch.setdefault("example_mask", np.ones(n, np.float32))
            batch = pad(batch, max(batch_size, n))
            self.shapes.add(_shape(batch))
            yield batch
        if i < 0:
            raise DataError(
                f"`{self.argument}`: The data is empty: the iterable yielded no batches (a generator is used up after "
                "one pass). Pass batches, or a list of them (re-iterated every epoch)."
            )


def first_fit(lengths: np.ndarray, width: int) -> tuple[list[int], np.ndarray]:
    """Examples of ``lengths`` into rows of ``width`` tokens, longest first, each into the first row with room
    (first-fit decreasing). Returns the tokens used per row and ``[n, 2]`` (row, first column) per example."""
    used: list[int] = []
    where = np.zeros((len(lengths), 2), np.int64)
    for i in np.argsort(-np.asarray(lengths), kind="stable"):
        n = int(lengths[i])
        row = next((r for r, u in enumerate(used) if u + n <= width), len(used))
        if row == len(used):
            used.append(0)
        where[i] = row, used[row]
        used[row] += n
    return used, where


GROUP_BATCHES = 50  # batches sorted together by `ArrayData.batches(group=True)` (the Trainer's megabatch size)


def _grouped_by_length(order: np.ndarray, lengths: np.ndarray, batch_size: int, rng: Any) -> list[np.ndarray]:
    """Batches of ``order`` with similar lengths: runs of GROUP_BATCHES batches sorted longest first, then shuffled."""
    run = batch_size * GROUP_BATCHES
    slices: list[np.ndarray] = []
    for first in range(0, len(order), run):
        chunk = order[first : first + run]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        slices.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [slices[i] for i in rng.permutation(len(slices))]


def pad(batch: Batch, size: int) -> Batch:
    """Pads every column to ``size`` rows (``example_mask`` 0 and label ids -100 on the added rows, else zeros)."""
    n = len(batch["example_mask"])
    if n == size:
        return batch

    def fill(name: str, v: np.ndarray) -> np.ndarray:
        value = -100 if name == "labels" and v.dtype.kind == "i" else 0
        return np.concatenate([v, np.full((size - n, *v.shape[1:]), value, v.dtype)])

    return {k: fill(k, v) for k, v in batch.items()}


def _shape(batch: Batch) -> tuple[int, ...]:
    inputs = model_inputs(batch)
    key = "input_ids" if "input_ids" in inputs else next(iter(sorted(inputs)), None)
    return tuple(batch[key].shape) if key is not None else ()
