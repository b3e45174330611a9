"""Label values -> class ids, checked against the model's head; label names -> ``id2label`` / ``label2id``.

Rules, one per kind of label column:

* ``ClassLabel`` features give the names; their ids are used as they are.
* Strings get a sorted vocabulary (``["neg", "pos"]`` -> 0, 1), unless the model already has label names that cover
  them (a second `fit`, or evaluation after training), in which case the model's order is kept.
* Integers are class ids and must lie in ``[0, num_labels)``.
* Floats are regression targets when the head has one output.
* A list per example is multi-label: names or ids become a multi-hot ``[N, num_labels]`` float32 array; lists of
  floats are taken as multi-hot already.
* A 2-D array is one label per example when it is ``[N, 1]`` (class ids, or regression targets), and multi-hot
  targets when it is ``[N, num_labels]`` of values in [0, 1]; any other shape is refused.
* NaN or infinite labels are refused, naming their rows, whatever the kind (`finetune.data.check.check_finite`).

Names found in the data are written to ``model.id2label`` and to ``model.hf_config`` (``id2label`` / ``label2id``), so
they end up in exported configs.

The third stage of the data's path (`finetune.data.pipeline`): `encode_columns` encodes the label columns that
`finetune.data.columns` found, before any text is tokenized or image processed, so bad labels are refused first.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from finetune.data.check import CLASSIFICATION_TASKS, check_finite, check_range, num_labels
from finetune.data.columns import RAW_COLUMNS, find_columns
from finetune.data.sources import is_row, load_file, ragged, rows_to_columns
from finetune.errors import DataError


def names_of(model: Any) -> list[str] | None:
    """The model's label names in id order, or None when it has none (or only ``LABEL_0``-style defaults)."""
    id2label = getattr(model, "id2label", None) or getattr(getattr(model, "hf_config", None), "id2label", None)
    if not id2label:
        return None
    names = [str(id2label[i]) for i in sorted(int(k) for k in id2label)]
    return None if all(re.fullmatch(r"LABEL_\d+", n) for n in names) else names


def set_names(model: Any, names: Sequence[str]) -> None:
    """Writes label names to ``model.id2label`` and, when present, to ``model.hf_config``."""
    if model is None:
        return
    id2label = {i: str(n) for i, n in enumerate(names)}
    model.id2label = id2label
    config = getattr(model, "hf_config", None)
    if config is not None:
        config.id2label = dict(id2label)
        config.label2id = {n: i for i, n in id2label.items()}


def encode(
    values: Any, *, model: Any, column: str, stage: str = "fit", names: Sequence[str] | None = None
) -> np.ndarray:
    """Class ids (int32 ``[N]``), multi-hot targets (float32 ``[N, C]``) or regression targets (float32 ``[N]``).

    Args:
      values: One label per example: a scalar, or a list of labels (multi-label).
      model: The `finetune.Model` being trained (None skips every check against the head).
      column: The column's name, for error messages.
      stage: ``fit`` may set the model's label names; ``evaluate`` / ``predict`` must use the ones it has.
      names: Label names given by the data set (a ``ClassLabel`` feature).

    Returns:
      The encoded labels.

    Raises:
      DataError: Labels outside the head's range, or label names that disagree with ``num_labels``.

    Example:
      >>> encode(["pos", "neg", "pos"], model=None, column="label")
      array([1, 0, 1], dtype=int32)
    """
    if isinstance(values, np.ndarray) and values.ndim == 2:
        return _label_matrix(values, model=model, column=column, stage=stage, names=names)
    values = list(values) if not isinstance(values, np.ndarray) else values
    if len(values) and isinstance(values[0], list | tuple | np.ndarray):
        matrix = _as_matrix(values, num_labels(model))
        if matrix is not None:
            return _label_matrix(matrix, model=model, column=column, stage=stage, names=names)
        return _multi_hot(values, model=model, column=column, stage=stage, names=names)
    array = np.asarray(values)
    size = num_labels(model)
    if array.dtype.kind == "f":
        check_finite(array, column)
    if array.dtype.kind in "USO":
        vocab = vocabulary(np.unique(array.astype(str)), model=model, column=column, stage=stage)
        return _ids(array.astype(str), vocab)
    if names is not None:
        _check_names(names, model, column, stage)
    if array.dtype.kind == "f" and (size == 1 or not np.all(np.mod(array, 1) == 0)):
        if size is not None and size != 1:
            raise DataError(
                f"Column `{column}` holds non-integer numbers (e.g. {array[np.mod(array, 1) != 0][0]!r}), which are "
                f"regression targets, but the model has num_labels={size}. Load the model with num_labels=1 for "
                "regression, or pass integer class ids."
            )
        return array.astype(np.float32)
    if size == 1:
        return array.astype(np.float32)
    ids = array.astype(np.int64)
    check_range(ids, size, column)
    return ids.astype(np.int32)


def _as_matrix(values: Sequence[Any], size: int | None) -> np.ndarray | None:
    """Lists of numbers that form a label matrix: one per example (``[N, 1]``), or 0/1 rows of width ``size``
    (multi-hot). None for lists of names or ids, which `_multi_hot` encodes."""
    lengths = {len(v) for v in values}
    if len(lengths) != 1 or not all(isinstance(v, list | tuple | np.ndarray) for v in values):
        return None
    try:
        matrix = np.asarray(values)
    except ValueError:
        return None
    if matrix.ndim != 2 or matrix.dtype.kind not in "biuf" or not matrix.size:
        return None
    if matrix.shape[1] == 1 or (matrix.shape[1] == size and np.isin(matrix, (0, 1)).all()):
        return matrix
    return None


def _label_matrix(values: np.ndarray, *, model: Any, column: str, stage: str, names: Sequence[str] | None):
    """A 2-D label array: ``[N, 1]`` is one label per example; ``[N, num_labels]`` in [0, 1] is multi-hot."""
    if values.shape[1] == 1:
        return encode(values[:, 0], model=model, column=column, stage=stage, names=names)
    size = num_labels(model)
    numeric = values.dtype.kind in "biuf"
    if numeric and values.dtype.kind == "f":
        check_finite(values, column)
    if numeric and (size is None or values.shape[1] == size) and values.size and 0 <= values.min() <= values.max() <= 1:
        if names is not None:
            _check_names(names, model, column, stage)
        return values.astype(np.float32)
    width = f"num_labels={size}" if size is not None else "num_labels"
    raise DataError(
        f"Column `{column}` has labels of shape {values.shape} and dtype {values.dtype}, which are neither one label "
        f"per example ([N] or [N, 1]) nor multi-hot targets (values in [0, 1], [N, {width}]). Pass class ids of "
        "shape [N], or one 0/1 per label and example."
    )


def vocabulary(found: Any, *, model: Any, column: str, stage: str) -> list[str]:
    """The label names to use for the label strings ``found`` (any iterable): the model's when they cover them, else
    sorted."""
    found = sorted(map(str, found))
    existing = names_of(model)
    if existing is not None and set(found) <= set(existing):
        return existing
    if existing is not None and stage != "fit":
        unknown = sorted(set(found) - set(existing))
        raise DataError(
            f"Column `{column}` has labels the model was not trained on: {unknown[:10]}. The model's labels are "
            f"{existing}. Evaluate on data with the same label names as the training data."
        )
    _check_names(found, model, column, stage)
    return found


def _check_names(names: Sequence[str], model: Any, column: str, stage: str) -> None:
    size = num_labels(model)
    if size is not None and size != len(names):
        raise DataError(
            f"The data has {len(names)} labels in column `{column}` ({list(names)[:10]}), but the model has "
            f"num_labels={size}. Load the model with num_labels={len(names)} (finetune.load(..., "
            f"num_labels={len(names)})), or fix the labels."
        )
    if stage == "fit" or names_of(model) is None:
        set_names(model, names)


def _ids(array: np.ndarray, vocab: Sequence[str]) -> np.ndarray:
    lookup = {name: i for i, name in enumerate(vocab)}
    return np.fromiter((lookup[v] for v in array.reshape(-1)), np.int32, array.size).reshape(array.shape)


def _multi_hot(values: Sequence[Any], *, model: Any, column: str, stage: str, names: Sequence[str] | None):
    flat = np.asarray([v for row in values for v in row])
    size = num_labels(model)
    if flat.dtype.kind == "f":
        check_finite(flat, column)
        out = np.asarray([np.asarray(row, np.float32) for row in values])
        if out.ndim != 2 or (size is not None and out.shape[1] != size):
            raise DataError(
                f"Column `{column}` holds lists of floats, read as multi-hot targets, but they are not all of length "
                f"num_labels={size} (shape {out.shape}). Pass one 0/1 per label, or lists of label names / ids."
            )
        return out
    if flat.dtype.kind in "USO":
        vocab = vocabulary(np.unique(flat.astype(str)), model=model, column=column, stage=stage)
        flat = _ids(flat.astype(str), vocab)
        size = len(vocab)
    elif names is not None:
        _check_names(names, model, column, stage)
        size = len(names)
    else:
        check_range(flat.astype(np.int64), size, column)
        size = size or int(flat.max()) + 1
    out = np.zeros((len(values), size), np.float32)
    rows = np.repeat(np.arange(len(values)), [len(v) for v in values])
    out[rows, flat.astype(np.int64)] = 1.0
    return out


def from_data(data: Any, task: str, columns: Mapping[str, str] | None = None) -> tuple[int | None, list[str] | None]:
    """``(num_labels, names)`` that ``data`` implies for a new head of ``task``, by the rules of this module.

    Names come from a ``ClassLabel`` feature, else from the sorted distinct label strings; integer class ids give
    ``max + 1`` outputs (``-100``, "no label", aside) and no names; non-integer floats are regression (one output);
    lists of floats per example are multi-hot rows of their width. ``(None, None)`` for data that carries no labels
    this function can see (ready batches, a task without labels).

    Args:
      data: What `Model.fit` takes: a `datasets.Dataset`, a file path, raw or numeric columns, rows, ``(x, y)``.
      task: The model's task.
      columns: Explicit column names by role (the recipe's ``columns``).

    Example:
      >>> from_data({"text": ["good", "bad", "fine"], "label": ["pos", "neg", "pos"]}, "text-classification")
      (2, ['neg', 'pos'])
    """
    if task not in CLASSIFICATION_TASKS:
        return None, None
    values, feature = _label_column(data, task, columns)
    if values is None:
        return None, None
    inner = getattr(feature, "feature", feature)  # a Sequence(ClassLabel) of token tags, or the ClassLabel itself
    if getattr(inner, "names", None):
        return len(inner.names), [str(n) for n in inner.names]
    rows = list(values)
    nested = bool(rows) and isinstance(rows[0], list | tuple | np.ndarray)
    flat = np.asarray([v for row in rows for v in row] if nested else rows)
    if flat.size == 0:
        return None, None
    if flat.dtype.kind in "USO":
        names = sorted(set(flat.astype(str).tolist()))
        return len(names), names
    if flat.dtype.kind == "f" and nested and task != "token-classification":
        return len(rows[0]), None  # multi-hot rows, one 0/1 per label
    if flat.dtype.kind == "f" and not np.all(np.mod(flat, 1) == 0):
        return 1, None
    real = flat[flat != -100].astype(np.int64)
    return (int(real.max()) + 1, None) if real.size and real.min() >= 0 else (None, None)


def _label_column(data: Any, task: str, columns: Mapping[str, str] | None) -> tuple[Any, Any]:
    """``(label values, datasets feature or None)`` of the data's label column, as
    `finetune.data.pipeline.as_source` finds it; ``(None, None)`` when there is none."""
    import datasets

    if isinstance(data, str | os.PathLike):
        data = load_file(data)
    if isinstance(data, tuple) and len(data) == 2:
        return data[1], None
    if isinstance(data, list) and data and all(is_row(x) for x in data):
        data = rows_to_columns(data)
    if isinstance(data, Mapping):
        if "labels" in data and not RAW_COLUMNS & set(data):  # numeric model inputs, labels as they are
            return data["labels"], None
        data = datasets.Dataset.from_dict({k: list(v) for k, v in data.items()})
    if not isinstance(data, datasets.Dataset):
        return None, None
    role = "tags" if task == "token-classification" else "label"
    column = find_columns(data.column_names, task, columns, need_labels=False).get(role)
    return (None, None) if column is None else (data[column], data.features[column])


def encode_columns(ds: Any, cols: Mapping[str, str], *, model: Any, stage: str) -> dict[str, Any]:
    """The labels of a table, encoded by the roles `finetune.data.columns.roles` found: ``labels`` (one per
    example, `encode_label_column`), ``labels`` as ragged ``(values, offsets)`` of an already tokenized table's token
    ids (checked against the head), or ``word_labels``: the encoded tags of every word (`encode_tags`), which
    `finetune.data.text` aligns to the word pieces.
    """
    out: dict[str, Any] = {}
    if "label" in cols:
        out["labels"] = encode_label_column(ds, cols["label"], model=model, stage=stage)
    if "token_labels" in cols:
        out["labels"] = ragged(ds, cols["token_labels"])
        check_range(out["labels"][0].astype(np.int64), num_labels(model), cols["token_labels"])
    if "tags" in cols:
        out["word_labels"] = encode_tags(ds, cols["tokens"], cols["tags"], model=model, stage=stage)
    return out


def encode_label_column(ds: Any, column: str, *, model: Any, stage: str) -> np.ndarray:
    """The label column encoded by `encode`, with names from a ``ClassLabel`` feature if any."""
    feature = ds.features[column]
    names = getattr(feature, "names", None) or getattr(getattr(feature, "feature", None), "names", None)
    arrow = ds.with_format("arrow")[column]
    values = arrow.to_pylist() if hasattr(feature, "feature") else arrow.to_numpy(zero_copy_only=False)
    if any(v is None for v in (values if isinstance(values, list) else values.tolist())):
        raise DataError(f"Column `{column}` has missing (None) labels. Drop those examples or fill in their labels.")
    return encode(values, model=model, column=column, stage=stage, names=names)


def encode_tags(ds: Any, words: str, tags: str, *, model: Any, stage: str) -> tuple[np.ndarray, np.ndarray]:
    """Token classification: the tag of every word, encoded by `encode`, as ``(flat ids, offsets)`` per example;
    every example must have one tag per word."""
    tag_rows, word_rows = ds[tags], ds[words]
    bad = next((i for i, (a, b) in enumerate(zip(tag_rows, word_rows, strict=True)) if len(a) != len(b)), None)
    if bad is not None:
        raise DataError(
            f"Example {bad} has {len(word_rows[bad])} words in `{words}` but {len(tag_rows[bad])} tags in "
            f"`{tags}`. Give every word exactly one tag."
        )
    feature = getattr(ds.features[tags], "feature", None)
    flat = encode(
        np.asarray([t for row in tag_rows for t in row]), model=model, column=tags, stage=stage,
        names=getattr(feature, "names", None),
    )  # fmt: skip
    return flat, np.concatenate([[0], np.cumsum([len(row) for row in tag_rows])])
