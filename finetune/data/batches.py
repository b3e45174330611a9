"""Data in, batches out: data sets, files, arrays or batches -> shuffled, bucketed, padded, masked batches on device.

What `fit` / `evaluate` / `predict` accept, and what happens to it:

* a `datasets.Dataset` (one split of a ``DatasetDict``), a path to a local ``.csv`` / ``.tsv`` / ``.json`` /
  ``.jsonl`` / ``.parquet`` file (read with `datasets`), or a dict / ``(x, y)`` pair holding raw text, words or
  images: columns are found by name (`finetune.data.text.find_columns`), text is tokenized with the checkpoint's own
  tokenizer and images processed with its image processor, once per data set (batched ``map``), and labels encoded
  (`finetune.data.labels`). The result is cached per model, so validation data is not re-tokenized every epoch.
* a dict of numeric numpy arrays (model inputs and ``labels``) or an ``(x, y)`` pair of numeric arrays: used as is.
* an iterable of ready batches (dicts of arrays): re-iterated every epoch.

Every data set is checked against the model once, before the first step (`finetune.data.check`): the model's inputs,
token ids within its embedding table, user-given sequences within its positions, labels finite and of the head's
kind, shape and range, one value type per raw column, image files, dtypes and ranges, and no empty data. `fit`
prepares (and so checks) its validation data before training starts. ``predict`` ignores labels.

Token sequences are kept ragged and every batch is padded to the smallest length bucket that holds its longest
sequence, so only a few shapes are ever compiled. The buckets are fitted to the data set's lengths (`fitted_buckets`):
as many as powers of two from 16 up to ``max_length`` would use, at the multiples of 8 that leave the fewest padding
tokens. Every batch has the same number of rows: the last partial batch is padded with rows whose ``example_mask``
is 0, so it is neither dropped nor recompiled, and padding (rows and tokens) never counts in the loss or the
metrics. Batches are prepared on a background thread and put on device ahead of the step that needs them
(`prefetch`).
"""

from __future__ import annotations

import collections
import copy
import functools
import logging
import os
import pathlib
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from finetune.data import check as datacheck
from finetune.data import labels as labels_lib
from finetune.data.buckets import BUCKET_MULTIPLE, SMALLEST_BUCKET, fitted_buckets, length_buckets  # noqa: F401
from finetune.data.prefetch import prefetch, prefetch_on_thread  # noqa: F401  (part of this module's interface)
from finetune.errors import DataError

logger = logging.getLogger("finetune")

Batch = dict[str, np.ndarray]
FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


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
        self.lengths = None
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
        more (2,000 reviews, seed 0: 17 rows in the first epoch, 21 in the worst batch of four epochs)."""
        key = (batch_size, seed)
        if key not in self._packed_rows:
            width = self.buckets[-1]
            need = [len(_first_fit(self.lengths[i], width)[0]) for i in self._slices(batch_size, seed, 0, False)]
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
        used, where = _first_fit(lengths, width)
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

    def __init__(self, batches: Iterable[Mapping[str, Any]], *, check: Any = None, argument: str = "data"):
        self.source = batches
        self.check, self.argument = check, argument
        self.size = None
        self.shapes: set[tuple[int, ...]] = set()

    def steps(self, batch_size: int) -> int | None:
        return len(self.source) if hasattr(self.source, "__len__") else None

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


def _first_fit(lengths: np.ndarray, width: int) -> tuple[list[int], np.ndarray]:
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
    slices = []
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
    from finetune.training.tasks import model_inputs

    inputs = model_inputs(batch)
    key = "input_ids" if "input_ids" in inputs else next(iter(sorted(inputs)), None)
    return tuple(batch[key].shape) if key is not None else ()


# ---------------------------------------------------------------- what the user passes -> a source
def as_source(
    data: Any,
    *,
    task: str,
    model: Any = None,
    columns: Mapping[str, str] | None = None,
    max_length: int | None = None,
    packing: bool = False,
    stage: str = "fit",
    padding: str = "buckets",
    argument: str = "data",
) -> ArrayData | BatchIterable:
    """Wraps what the user passed into a source of batches (``.batches(...)``, ``.steps(...)``), checked against the
    model before any step runs (`finetune.data.check`).

    Args:
      data: A `datasets.Dataset`, a path to a local csv / tsv / json / jsonl / parquet file, a dict of arrays or of
        raw columns (``{"text": [...], "label": [...]}``), a list of rows (``[{"text": ..., "label": ...}]``), a
        list of texts (a ``text`` column, no labels: for prediction), an ``(x, y)`` pair, an iterable of ready
        batches, or a source made earlier (returned as is).
      task: The model's task (decides which columns are needed and how they are encoded).
      model: The `finetune.Model`: its tokenizer / image processor, label names (set from the data when
        ``stage="fit"``), ``num_labels`` and positions (checked).
      columns: Explicit column names by role, e.g. ``{"text": "review", "label": "sentiment"}``; roles are
        ``text``, ``text_pair``, ``label``, ``image``, ``tokens``, ``tags``, ``prompt``, ``completion``, ``messages``.
      max_length: Longest token sequence (longer ones are truncated and counted in the log). Default:
        ``min(512, the model's positions)``.
      packing: Causal LM only: concatenate short examples into rows of up to ``max_length`` tokens.
      stage: ``fit`` (labels required; label names may be set on the model), ``evaluate`` (labels required) or
        ``predict`` (labels ignored).
      padding: ``buckets`` (pad each batch to the smallest length bucket) or ``longest`` (pad every batch to the data
        set's longest sequence: one shape, so per-token outputs of all batches can be concatenated).
      argument: The name of the argument that took ``data`` (``train``, ``validation_data``...), for messages.

    Returns:
      An `ArrayData` (or a `BatchIterable` for ready batches).

    Raises:
      DataError: Data of an unsupported type, a missing column, bad labels, an empty data set, no tokenizer, or
        data the model cannot take (`finetune.data.check`). The message starts with ``argument``.

    Example:
      >>> source = as_source({"text": ["good", "bad"], "label": ["pos", "neg"]}, task="text-classification",
      ...                    model=model)
      >>> batch = next(source.batches(32, seed=0))
    """
    if isinstance(data, ArrayData | BatchIterable):
        return data
    options = dict(task=task, model=model, columns=columns, max_length=max_length, packing=packing, stage=stage)
    try:
        return _as_source(data, padding=padding, argument=argument, **options)
    except DataError as e:
        raise DataError(f"`{argument}`: {e}") from None


def _as_source(data: Any, *, padding: str, argument: str, **options: Any) -> ArrayData | BatchIterable:
    task, model, stage = options["task"], options["model"], options["stage"]
    if isinstance(data, list | tuple | Mapping) and len(data) == 0:
        raise DataError(f"The data is empty (an empty {type(data).__name__}). Pass at least one example.")
    if isinstance(data, str | os.PathLike):
        data = load_file(data)
    import datasets

    if isinstance(data, datasets.DatasetDict):
        raise DataError(
            f"Received a DatasetDict with splits {list(data)}; pass one split of it, e.g. "
            f"data[{next(iter(data), 'train')!r}]."
        )
    if isinstance(data, list | tuple) and data and all(isinstance(x, str) for x in data):
        data = {"text": list(data)}  # raw texts, e.g. predict(["a review", ...]); fit and evaluate need labels too
    elif isinstance(data, list) and data and all(_is_row(x) for x in data):
        data = rows_to_columns(data)
    elif isinstance(data, tuple) and len(data) == 2:
        data = _pair_to_columns(data, task=task, model=model)
    if isinstance(data, Mapping) and _numeric(data):
        cols = dict(data)
        if stage == "predict":
            cols.pop("labels", None)  # predictions need no labels
        elif "labels" in cols and task not in ("causal-lm", "token-classification"):  # those are per token, as given
            cols["labels"] = labels_lib.encode(cols["labels"], model=model, column="labels", stage=stage)
        source = ArrayData(cols)
        datacheck.check(source, model=model, task=task, stage=stage)
        return source
    if isinstance(data, Mapping):
        data = datacheck.to_dataset(data)
    if isinstance(data, datasets.Dataset):
        return _cached(data, padding=padding, **options)
    if isinstance(data, datasets.IterableDataset):
        raise DataError(
            "Streaming data sets (datasets.IterableDataset) are not supported. Load the data set without "
            "`streaming=True`, or pass an iterable of ready batches (dicts of arrays)."
        )
    if isinstance(data, Iterable) and not isinstance(data, str | bytes | np.ndarray):
        check = functools.partial(datacheck.check_batch, model=model, task=task, stage=stage)
        return BatchIterable(data, check=check, argument=argument)
    raise DataError(
        f"Cannot make batches from data of type {type(data).__name__}. Pass a datasets.Dataset, a path to a csv / "
        "json / parquet file, a dict of numpy arrays (with a `labels` column), an (x, y) pair of arrays, or an "
        "iterable of ready batches (dicts of arrays)."
    )


def rows_to_columns(rows: list[Mapping[str, Any]]) -> dict[str, list]:
    """``[{"text": ..., "label": ...}, ...]`` -> ``{"text": [...], "label": [...]}``: every column any row has, in
    order of appearance, with None where a row lacks it.

    Example:
      >>> rows_to_columns([{"text": "good", "label": 1}, {"text": "bad", "label": 0, "id": 7}])
      {'text': ['good', 'bad'], 'label': [1, 0], 'id': [None, 7]}
    """
    names = dict.fromkeys(k for row in rows for k in row)
    return {k: [row.get(k) for row in rows] for k in names}


def _is_row(item: Any) -> bool:
    """Whether ``item`` is one example as a dict of scalars (a row), rather than a ready batch (a dict of arrays)."""
    scalar = str | int | float | bool | np.generic | None
    return isinstance(item, Mapping) and all(isinstance(v, scalar) for v in item.values())


def load_file(path: str | os.PathLike) -> Any:
    """A local csv / tsv / json / jsonl / parquet file as a `datasets.Dataset` (cached by `datasets`)."""
    path = pathlib.Path(path)
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"Cannot read data from {str(path)!r}: the suffix {path.suffix!r} is not one of "
            f"{', '.join(FILE_FORMATS)}. Pass a file of one of these formats, or a datasets.Dataset."
        )
    if not path.is_file():
        raise DataError(f"The data file {str(path)!r} does not exist. Pass the path of an existing file.")
    import datasets

    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # pandas / pyarrow / datasets errors on a malformed or empty file
        if "corresponds to no data" not in str(e):  # datasets' words for a file without rows
            raise DataError(
                f"The data file {str(path)!r} cannot be read as {fmt}: {type(e).__name__}: {e}. Check the file's "
                "format (one header row, the same columns in every row)."
            ) from None
        ds = None
    if ds is None or len(ds) == 0:
        raise DataError(f"The data file {str(path)!r} has no rows (at most a header). Pass a file with examples.")
    return ds


def _numeric(data: Mapping[str, Any]) -> bool:
    """Whether every input column is a numeric array (used as is), rather than raw text, words or images."""
    from finetune.data.text import RAW_COLUMNS

    if RAW_COLUMNS & set(data):
        return False
    try:
        return all(np.asarray(v).dtype.kind in "biuf" for k, v in data.items() if k != "labels")
    except ValueError:  # ragged lists
        return False


def _pair_to_columns(data: tuple, *, task: str, model: Any) -> Mapping[str, Any]:
    """``(x, y)`` -> columns: numeric ``x`` becomes a model input, raw text / images a ``text`` / ``image`` column."""
    x, y = data
    if isinstance(x, Mapping):
        return {**x, "labels": y}
    first = x[0] if len(x) else None
    if isinstance(first, str) or (isinstance(x, np.ndarray) and x.dtype.kind in "US"):
        return {"text": list(x), "label": list(y)}
    if task == "image-classification" and not isinstance(x, np.ndarray) and len({np.shape(i) for i in x}) > 1:
        return {"image": list(x), "label": list(y)}  # images of several sizes: the image processor resizes them
    x = np.asarray(x)
    if task == "image-classification":
        config = getattr(model, "hf_config", None)
        channels = getattr(config, "num_channels", 3)
        if not (x.ndim == 4 and x.dtype.kind == "f" and x.shape[1] == channels):
            from finetune.data.images import pixels

            x = pixels(x, "`x` of the (x, y) pair")  # checked at once, not one by one after a copy
            return {"image": list(x), "label": list(y)}  # raw images: the model's image processor prepares them
        return {"pixel_values": x, "labels": y}
    key = "input_ids" if np.issubdtype(x.dtype, np.integer) and x.ndim == 2 else "x"
    return {key: x, "labels": y}


# Prepared sources per model, keyed by what decides the result; validation data is then tokenized once, not per epoch.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CACHE_SIZE = 8


def _cached(data: Any, *, model: Any, padding: str, **options: Any) -> ArrayData:
    from finetune.data import text as preprocess

    columns = options.pop("columns")

    def key() -> tuple:
        return (
            data._fingerprint,
            tuple(sorted((columns or {}).items())),
            tuple(sorted((k, v) for k, v in options.items() if k != "stage")),
            options["stage"] == "predict",
            padding,
            tuple(labels_lib.names_of(model) or ()),
            id(getattr(model, "tokenizer", None)),
            id(getattr(model, "processor", None)),
        )

    per_model = _CACHE.setdefault(model, collections.OrderedDict()) if model is not None else {}
    before = key()
    if before in per_model:
        return per_model[before].view()
    prepared = preprocess.prepare(data, model=model, columns=columns, **options)
    buckets = None
    if prepared.sequences:
        lengths = np.diff(next(iter(prepared.sequences.values()))[1])
        if padding == "buckets":
            buckets = fitted_buckets(lengths, prepared.max_length)
        else:  # "longest": one shape, the longest sequence
            buckets = (min(prepared.max_length, int(lengths.max())),)
    source = ArrayData(prepared.columns, sequences=prepared.sequences, buckets=buckets, pad_values=prepared.pad_values)
    datacheck.check(source, model=model, task=options["task"], stage=options["stage"])
    if model is not None:
        per_model[before] = per_model[key()] = source  # the label names may have just been set from this data
        while len(per_model) > _CACHE_SIZE:
            per_model.popitem(last=False)
    return source.view()


def count_labels(ds: Any, task: str, columns: Mapping[str, str] | None = None) -> int | None:
    """How many classes a `datasets.Dataset` has for ``task`` (for sizing a new head); None when it has no labels.

    ``ClassLabel`` features give their size; otherwise `finetune.data.labels.from_data`'s rules (names: their count;
    ids: ``max + 1``; non-integer floats of a one-output head: regression, 1).
    """
    return labels_lib.from_data(ds, task, columns)[0]
