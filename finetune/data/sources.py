"""What the user passed -> a table: files, texts, rows, ``(x, y)`` pairs and raw columns become a `datasets.Dataset`;
numeric columns stay numpy arrays (model inputs, used as they are); anything else is handed on as it is.

The first stage of the data's path (`finetune.data.pipeline`): it knows the forms data comes in, not what a column
means (`finetune.data.columns`). It also holds the two ways later stages read a table: one batched ``map``
(`run_map`) and a list column as flat numpy (`ragged`).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from finetune.data.check import check_column_types, pixels
from finetune.errors import DataError

FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def read(data: Any, *, task: str, model: Any, raw_columns: frozenset[str]) -> Any:
    """``data`` as a `datasets.Dataset` (files, texts, rows, pairs and raw columns), a dict of numeric arrays (model
    inputs and ``labels``), or as it came (a `datasets.Dataset`, an iterable of ready batches, anything else).

    Args:
      data: What `fit` / `evaluate` / `predict` took (see `finetune.data.pipeline.as_source`).
      task: The model's task (an ``(x, y)`` pair of images is read by it).
      model: The `finetune.Model` (its number of image channels).
      raw_columns: Column names that hold raw inputs (`finetune.data.columns.RAW_COLUMNS`): a dict with one of them
        becomes a table even when its values are numbers (images as arrays).

    Raises:
      DataError: Empty data, an unreadable file, a ``DatasetDict``, a streaming data set, or columns that mix types.
    """
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
    elif isinstance(data, list) and data and all(is_row(x) for x in data):
        data = rows_to_columns(data)
    elif isinstance(data, tuple) and len(data) == 2:
        data = pair_to_columns(data, task=task, model=model)
    if isinstance(data, Mapping):
        return dict(data) if _numeric(data, raw_columns) else to_dataset(data)
    if isinstance(data, datasets.IterableDataset):
        raise DataError(
            "Streaming data sets (datasets.IterableDataset) are not supported. Load the data set without "
            "`streaming=True`, or pass an iterable of ready batches (dicts of arrays)."
        )
    return data


def rows_to_columns(rows: list[Mapping[str, Any]]) -> dict[str, list]:
    """``[{"text": ..., "label": ...}, ...]`` -> ``{"text": [...], "label": [...]}``: every column any row has, in
    order of appearance, with None where a row lacks it.

    Example:
      >>> rows_to_columns([{"text": "good", "label": 1}, {"text": "bad", "label": 0, "id": 7}])
      {'text': ['good', 'bad'], 'label': [1, 0], 'id': [None, 7]}
    """
    names = dict.fromkeys(k for row in rows for k in row)
    return {k: [row.get(k) for row in rows] for k in names}


def is_row(item: Any) -> bool:
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


def _numeric(data: Mapping[str, Any], raw_columns: frozenset[str]) -> bool:
    """Whether every input column is a numeric array (used as is), rather than raw text, words or images."""
    if raw_columns & set(data):
        return False
    try:
        return all(np.asarray(v).dtype.kind in "biuf" for k, v in data.items() if k != "labels")
    except ValueError:  # ragged lists
        return False


def pair_to_columns(data: tuple, *, task: str, model: Any) -> Mapping[str, Any]:
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
            x = pixels(x, "`x` of the (x, y) pair")  # checked at once, not one by one after a copy
            return {"image": list(x), "label": list(y)}  # raw images: the model's image processor prepares them
        return {"pixel_values": x, "labels": y}
    key = "input_ids" if np.issubdtype(x.dtype, np.integer) and x.ndim == 2 else "x"
    return {key: x, "labels": y}


def to_dataset(columns: Mapping[str, Any]) -> Any:
    """Raw columns (``{"text": [...], "label": [...]}``) as a `datasets.Dataset`, each column checked for mixed
    types first (`check_column_types`), so that a bad row is named instead of failing inside pyarrow."""
    import datasets
    import pyarrow

    for name, values in columns.items():
        check_column_types(name, values)
    try:
        return datasets.Dataset.from_dict({k: list(v) for k, v in columns.items()})
    except (pyarrow.ArrowException, TypeError, ValueError) as e:
        raise DataError(
            f"The columns {list(columns)} cannot be stored as a table: {type(e).__name__}: {e}. Give every column "
            "values of one type and shape, or pass a datasets.Dataset."
        ) from None


def run_map(ds: Any, fn: Callable, parts: Any, **kwargs: Any) -> Any:
    """``ds.map(fn)`` batched, replacing every column, under a fingerprint of ``parts`` (so `datasets` can cache)."""
    from datasets.fingerprint import Hasher

    return ds.map(
        fn,
        batched=True,
        batch_size=1000,
        with_indices=True,
        remove_columns=ds.column_names,
        new_fingerprint=Hasher.hash(("finetune-v1", parts)),
        desc="finetune: preparing data",
        **kwargs,
    )


def ragged(ds: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column of ``ds`` as ``(values int32, offsets int64)``, read from Arrow without Python lists."""
    column = ds.with_format("arrow")[name].combine_chunks()
    values = column.values.to_numpy(zero_copy_only=False)
    return values.astype(np.int32, copy=False), column.offsets.to_numpy().astype(np.int64)
