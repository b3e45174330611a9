"""Data in, batches out: the one function that takes what the user passed along the data's path, stage by stage.

`as_source` calls each stage once, in order, and no stage calls back up: `finetune.data.sources` (what was passed ->
a table), `finetune.data.columns` (which column is what), `finetune.data.labels` (labels encoded and checked first,
before any work on the inputs), `finetune.data.text` or `finetune.data.images` (token ids or pixels),
`finetune.data.batches` (an `ArrayData`), then `finetune.data.check` against the model; `finetune.data.prefetch`
puts the batches on device.

What `fit` / `evaluate` / `predict` accept, and what happens to it:

* a `datasets.Dataset` (one split of a ``DatasetDict``), a path to a local ``.csv`` / ``.tsv`` / ``.json`` /
  ``.jsonl`` / ``.parquet`` file (read with `datasets`), or a dict / ``(x, y)`` pair holding raw text, words or
  images: columns are found by name (`finetune.data.columns.find_columns`), labels encoded
  (`finetune.data.labels`), text tokenized with the checkpoint's own tokenizer and images processed with its image
  processor, once per data set (batched ``map``). The result is cached per model, so validation data is not
  re-tokenized every epoch.
* a dict of numeric numpy arrays (model inputs and ``labels``) or an ``(x, y)`` pair of numeric arrays: used as is.
* an iterable of ready batches (dicts of arrays): re-iterated every epoch.

Every data set is checked against the model once, before the first step (`finetune.data.check`): the model's inputs,
token ids within its embedding table, user-given sequences within its positions, labels finite and of the head's
kind, shape and range, one value type per raw column, image files, dtypes and ranges, and no empty data. `fit`
prepares (and so checks) its validation data before training starts. ``predict`` ignores labels.

Token sequences are kept ragged and every batch is padded to the smallest length bucket that holds its longest
sequence, so only a few shapes are ever compiled. The buckets are fitted to the data set's lengths
(`finetune.data.buckets.fitted_buckets`):
as many as powers of two from 16 up to ``max_length`` would use, at the multiples of 8 that leave the fewest padding
tokens. Every batch has the same number of rows: the last partial batch is padded with rows whose ``example_mask``
is 0, so it is neither dropped nor recompiled, and padding (rows and tokens) never counts in the loss or the
metrics. Batches are prepared on a background thread and put on device ahead of the step that needs them
(`prefetch`).
"""

from __future__ import annotations

import collections
import functools
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from finetune.data import check as datacheck
from finetune.data import columns as columns_lib
from finetune.data import images, sources, text
from finetune.data import labels as labels_lib
from finetune.data.batches import ArrayData, BatchIterable
from finetune.data.buckets import fitted_buckets
from finetune.data.columns import Prepared
from finetune.errors import DataError


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
    import datasets

    task, model, stage = options["task"], options["model"], options["stage"]
    table = sources.read(data, task=task, model=model, raw_columns=columns_lib.RAW_COLUMNS)
    if isinstance(table, Mapping):
        return _arrays(dict(table), task=task, model=model, stage=stage)
    if isinstance(table, datasets.Dataset):
        return _cached(table, padding=padding, **options)
    if isinstance(table, Iterable) and not isinstance(table, str | bytes | np.ndarray):
        check = functools.partial(datacheck.check_batch, model=model, task=task, stage=stage)
        return BatchIterable(table, check=check, argument=argument)
    raise DataError(
        f"Cannot make batches from data of type {type(table).__name__}. Pass a datasets.Dataset, a path to a csv / "
        "json / parquet file, a dict of numpy arrays (with a `labels` column), an (x, y) pair of arrays, or an "
        "iterable of ready batches (dicts of arrays)."
    )


def _arrays(cols: dict[str, Any], *, task: str, model: Any, stage: str) -> ArrayData:
    """Numeric columns (model inputs and ``labels``), used as they are: only their labels are encoded."""
    if stage == "predict":
        cols.pop("labels", None)  # predictions need no labels
    elif "labels" in cols and task not in ("causal-lm", "token-classification"):  # those are per token, as given
        cols["labels"] = labels_lib.encode(cols["labels"], model=model, column="labels", stage=stage)
    source = ArrayData(cols)
    datacheck.check(source, model=model, task=task, stage=stage)
    return source


def prepare(
    ds: Any,
    *,
    task: str,
    model: Any,
    columns: Mapping[str, str] | None = None,
    max_length: int | None = None,
    packing: bool = False,
    stage: str = "fit",
) -> Prepared:
    """A `datasets.Dataset` as numpy, stage by stage: its columns' roles, its labels, then its token ids or pixels.

    Args:
      ds: The data set.
      task: The model's task.
      model: The `finetune.Model` whose tokenizer / image processor, label names and positions are used.
      columns: Explicit column names by role (see `finetune.data.columns.find_columns`).
      max_length: Truncation length; default ``min(512, the model's positions)``.
      packing: Causal LM: concatenate consecutive examples into rows of up to ``max_length`` tokens.
      stage: ``fit`` / ``evaluate`` need labels, ``predict`` ignores them; only ``fit`` sets new label names.

    Example:
      >>> prepared = prepare(ds, task="text-classification", model=model, max_length=128)
    """
    if len(ds) == 0:
        raise DataError("The data set is empty (0 examples). Pass a data set with at least one example.")
    cols = columns_lib.roles(ds.column_names, task, columns, stage=stage)
    encoded = labels_lib.encode_columns(ds, cols, model=model, stage=stage)
    if task == "image-classification":
        return images.prepare(ds, cols, model=model, labels=encoded)
    options = dict(task=task, model=model, max_length=max_length, packing=packing, stage=stage)
    return text.prepare(ds, cols, labels=encoded, **options)


# Prepared sources per model, keyed by what decides the result; validation data is then tokenized once, not per epoch.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CACHE_SIZE = 8


def _cached(data: Any, *, model: Any, padding: str, **options: Any) -> ArrayData:
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

    fresh: collections.OrderedDict = collections.OrderedDict()
    per_model = _CACHE.setdefault(model, fresh) if model is not None else fresh
    before = key()
    if before in per_model:
        return per_model[before].view()
    prepared = prepare(data, model=model, columns=columns, **options)
    buckets = None
    if prepared.sequences and prepared.max_length is not None:  # sequences come with their truncation length
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
