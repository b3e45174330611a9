"""The checks of data against the model: one pass of vectorised numpy checks, each naming the fix.

Every stage of the data's path calls the checks of what it handles, and `finetune.data.pipeline.as_source` runs
`check` on every data set it prepares (training and validation data of `fit`, the data of `evaluate` and `predict`)
and `check_batch` on every ready batch an iterable gives, so that a data set the model cannot compute on is refused
with a `DataError` before any step runs, not answered with NaN logits, a silently wrong loss or an error from deep
inside jax. What is checked:

* the columns are inputs the model takes (its ``__call__``'s parameters), and those it needs are there;
* token ids lie in the embedding table (``[0, vocab_size)``), token type ids in ``[0, type_vocab_size)``;
* sequences the user tokenized fit in the model's positions (``max_position_embeddings``; finetune truncates what it
  tokenizes itself, `finetune.data.text.resolve_max_length`);
* labels are finite and of the head's kind, shape and range (`check_encoded`).

A tokenizer larger than the embedding table is refused before any text is tokenized (`check_tokenizer`), raw columns
(a dict or rows) whose values mix types are refused, naming a row of each type, before they become a table
(`check_column_types`), and image arrays are refused unless they are uint8-like or floats in [0, 1] (`pixels`).
This module imports no other stage of the data's path, so that every stage may use it.
Each check reads each array once (a minimum, a maximum, a mask), so 100k examples take milliseconds.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np

from finetune.errors import DataError

CLASSIFICATION_TASKS = ("text-classification", "token-classification", "image-classification")
# The columns of a batch that are not model inputs (the model is called with the others).
NOT_INPUTS = frozenset({"labels", "example_mask", "loss_mask"})
PACKING_INPUTS = frozenset({"segment_ids", "example_rows", "example_cols"})  # what finetune adds to packed batches

POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2}  # positions these models reserve for their padding scheme


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a batch the model is called with."""
    return {k: v for k, v in batch.items() if k not in NOT_INPUTS}


def num_labels(model: Any) -> int | None:
    """The number of outputs of the model's classifier, when the model says (None for plain modules)."""
    if model is None or getattr(model, "task", None) not in CLASSIFICATION_TASKS:
        return None
    config = getattr(model, "hf_config", None)
    if config is not None and getattr(config, "num_labels", None):
        return int(config.num_labels)
    return len(model.id2label) if getattr(model, "id2label", None) else None


def positions(model: Any) -> int | None:
    """How many token positions the model has (``max_position_embeddings``, less those reserved for padding)."""
    config = getattr(model, "hf_config", None)
    count = getattr(config, "max_position_embeddings", None)
    if not count:
        return None
    return int(count) - POSITION_OFFSET.get(str(getattr(config, "model_type", "")), 0)


def vocab_size(model: Any) -> int | None:
    """Rows of the model's token embedding table (its config's ``vocab_size``), or None when it has none."""
    size = getattr(getattr(model, "hf_config", None), "vocab_size", None)
    return int(size) if size else None


def check_tokenizer(tokenizer: Any, model: Any) -> None:
    """Refuses a tokenizer that can produce ids past the model's embedding table, before anything is tokenized."""
    size, tokens = vocab_size(model), len(tokenizer)
    if size is not None and tokens > size:
        raise DataError(
            f"The model's tokenizer has {tokens:,} tokens, but its embedding table has only `vocab_size`={size:,} "
            f"rows, so ids from {size:,} on would index past it. Use the tokenizer saved with the checkpoint "
            "(model.tokenizer = transformers.AutoTokenizer.from_pretrained('<the checkpoint>')), or a checkpoint "
            "whose vocabulary matches this tokenizer."
        )


def check(source: Any, *, model: Any, task: str, stage: str) -> None:
    """Checks a prepared `finetune.data.batches.ArrayData` against ``model`` (see the module doc); raises `DataError`.

    ``stage`` is ``fit``, ``evaluate`` or ``predict``: the first two need labels for a classification task.
    """
    if model is None:
        return
    _check_has_labels([*source.columns, *source.sequences], task, stage)
    sequences = {name: values for name, (values, _) in source.sequences.items()}
    arrays = {k: v for k, v in source.columns.items() if not hasattr(v, "dataset_column")} | sequences
    _check_inputs([*source.columns, *source.sequences], model)
    if source.sequences:
        offsets = next(iter(source.sequences.values()))[1]
        _check_length(int(np.diff(offsets).max(initial=0)), model, name="input_ids")
    _check_values(arrays, model, task, dense=set(source.columns) - set(sequences))


def check_batch(batch: Mapping[str, np.ndarray], *, model: Any, task: str, stage: str) -> None:
    """Checks one ready batch (of an iterable of batches), as `check` checks a data set."""
    if model is None:
        return
    _check_has_labels(list(batch), task, stage)
    _check_inputs(list(batch), model)
    if stage == "predict":  # predictions ignore labels, as they do in data sets
        batch = {k: v for k, v in batch.items() if k != "labels"}
    _check_values(batch, model, task, dense=set(batch))


def _check_has_labels(names: list[str], task: str, stage: str) -> None:
    if stage != "predict" and task in CLASSIFICATION_TASKS and "labels" not in names:
        raise DataError(
            f"The data has columns {list(names)} and no `labels`, which `{stage}` needs for task {task!r}. Add a "
            "`labels` column (or pass raw data with a label column), or use `predict`, which needs none."
        )


def _check_inputs(names: list[str], model: Any) -> None:
    """The data's input columns must be parameters of the model's ``__call__``, and its required ones present."""
    module: Any = getattr(model, "module", None)
    try:
        parameters = inspect.signature(module.__call__).parameters
    except (TypeError, ValueError, AttributeError):
        return
    kinds = {p.kind for p in parameters.values()}
    takes = [n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    shown = [n for n in takes if n not in PACKING_INPUTS]
    required = [n for n, p in parameters.items() if p.default is p.empty and n in takes]
    inputs = [n for n in names if n not in NOT_INPUTS]
    unknown = [] if inspect.Parameter.VAR_KEYWORD in kinds else [n for n in inputs if n not in takes]
    missing = [] if inspect.Parameter.VAR_POSITIONAL in kinds else [n for n in required if n not in names]
    if unknown or missing:
        what = f"columns {unknown} that it does not take" if unknown else f"no column {missing}, which it needs"
        raise DataError(
            f"The data has columns {list(names)}, and {type(module).__name__} was given {what}. The model takes "
            f"{', '.join(shown)} (required: {', '.join(required) or 'none'}), plus `labels`. Rename the columns to "
            "these inputs, or pass raw data (a `text` or `image` column) for finetune to tokenize or process."
        )


def _check_length(longest: int, model: Any, *, name: str) -> None:
    limit = positions(model)
    if limit is not None and longest > limit:
        raise DataError(
            f"Column `{name}` has sequences of {longest} tokens, but the model has `max_position_embeddings`={limit} "
            f"positions, so the positions past {limit} have no embedding. Truncate the ids to at most {limit} tokens "
            f"(e.g. input_ids[:, :{limit}]), or pass raw text, which finetune tokenizes and truncates."
        )


def _check_values(arrays: Mapping[str, Any], model: Any, task: str, *, dense: set[str]) -> None:
    """Token ids, token type ids, dense sequence lengths and labels of ``arrays`` against the model."""
    config = getattr(model, "hf_config", None)
    limits = {"input_ids": vocab_size(model), "token_type_ids": getattr(config, "type_vocab_size", None)}
    for name, size in limits.items():
        if name in arrays:
            _check_ids(np.asarray(arrays[name]), size, name)
    if "input_ids" in dense and np.ndim(arrays["input_ids"]) == 2:
        _check_length(int(np.shape(arrays["input_ids"])[1]), model, name="input_ids")
    if "labels" in arrays:
        check_encoded(np.asarray(arrays["labels"]), model=model, column="labels", task=task)


def _check_ids(ids: np.ndarray, size: int | None, name: str) -> None:
    if ids.size == 0:
        return
    if ids.dtype.kind not in "iub":
        raise DataError(
            f"Column `{name}` holds {ids.dtype} values, but token ids are integers. Pass integer ids (e.g. "
            f"np.asarray(ids, np.int32)), or raw text for finetune to tokenize."
        )
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (size is not None and high >= size):
        config_name = "vocab_size" if name == "input_ids" else "type_vocab_size"
        allowed = f"[0, {size})" if size is not None else "[0, ...)"
        bad = low if low < 0 else high
        raise DataError(
            f"Column `{name}` has the id {bad}, outside the model's embedding table {allowed} (`{config_name}`="
            f"{size}); the ids range over [{low}, {high}]. Tokenize with the tokenizer saved with the checkpoint, "
            "or fix the ids."
        )


def check_finite(array: np.ndarray, column: str) -> None:
    """Raises a `DataError` naming the rows of NaN or infinite labels (``array``: ``[N]`` or ``[N, ...]`` floats)."""
    finite = np.isfinite(array)
    if finite.all():
        return
    rows = np.flatnonzero(~finite.reshape(len(array), -1).all(axis=1))
    first = array[rows[0]]
    raise DataError(
        f"Column `{column}` has {len(rows)} non-finite label{'s' if len(rows) > 1 else ''} (NaN or infinite): rows "
        f"{rows[:5].tolist()}{' ...' if len(rows) > 5 else ''}, e.g. {first.tolist()!r} at row {rows[0]}. Drop those "
        "examples or fill in their labels (a NaN label is a missing label, and would make the loss NaN)."
    )


def check_encoded(labels: np.ndarray, *, model: Any, column: str, task: str) -> None:
    """Checks encoded labels (or the labels of a ready batch) against the model's head: finite, of the head's
    kind and shape (``[N]`` ids or targets, ``[N, num_labels]`` multi-hot, ``[N, T]`` token ids), ids in range.

    Raises:
      DataError: NaN / infinite labels, class ids outside ``[0, num_labels)``, or a shape the head cannot take.
    """
    if labels.dtype.kind == "f":
        check_finite(labels, column)
    if labels.dtype.kind not in "biuf":
        raise DataError(
            f"Column `{column}` holds {labels.dtype} labels; encoded labels are integer class ids or float targets. "
            "Pass the raw labels in a data set (they are encoded there), or integer ids."
        )
    size = num_labels(model)
    if task == "causal-lm":
        check_range(labels.astype(np.int64), vocab_size(model), column, limit="vocab_size")
    elif task == "token-classification" or (labels.dtype.kind in "iub" and labels.ndim == 1 and size != 1):
        check_range(labels.astype(np.int64), size, column)
    elif labels.ndim == 2 and task in CLASSIFICATION_TASKS and size is not None and labels.shape[1] != size:
        raise DataError(
            f"Column `{column}` has labels of shape {labels.shape}, read as multi-hot targets, but the model has "
            f"num_labels={size}. Pass one class id per example ([N]), or one 0/1 per label ([N, {size}])."
        )


def check_range(ids: np.ndarray, size: int | None, column: str, *, limit: str = "num_labels") -> None:
    """Raises a `DataError` naming both when ids fall outside ``[0, size)`` (-100 means "no label"); ``limit``
    names ``size`` (``num_labels`` for class ids, ``vocab_size`` for the token ids of a causal LM)."""
    real = ids[ids != -100]
    if not real.size:
        return
    low, high = int(real.min()), int(real.max())
    if low < 0 or (size is not None and high >= size):
        bad = sorted(set(real[(real < 0) | (real >= (size or np.iinfo(np.int64).max))].tolist()))[:5]
        fix = (
            f"Load the model with num_labels={high + 1} (finetune.load(..., num_labels={high + 1})), or fix the labels."
            if limit == "num_labels"
            else "Use the token ids of the model's tokenizer (-100 for tokens without a label)."
        )
        raise DataError(
            f"Column `{column}` has {'class' if limit == 'num_labels' else 'token'} ids outside [0, {limit}) = "
            f"[0, {size}): e.g. {bad} (the ids range over [{low}, {high}]). {fix}"
        )


# ---------------------------------------------------------------- raw values
def _kind(value_type: type) -> str:
    """The kind of a Python value for a table column: values of one column must all be of one kind (None aside)."""
    if issubclass(value_type, str | np.str_):
        return "text"
    if issubclass(value_type, bool | np.bool_):
        return "bool"
    if issubclass(value_type, int | float | np.integer | np.floating):
        return "number"
    if issubclass(value_type, list | tuple | np.ndarray):
        return "list or array"
    if issubclass(value_type, Mapping):
        return "dict"
    return value_type.__name__


def check_column_types(name: str, values: Any) -> None:
    """Refuses a column whose values mix kinds (text and numbers, say), naming the kinds and a row of each."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        return  # one dtype
    values = list(values)
    kinds = {t: _kind(t) for t in set(map(type, values)) if t is not type(None)}
    if len(set(kinds.values())) <= 1:
        return
    rows: dict[str, int] = {}
    for i, v in enumerate(values):
        if v is not None:
            rows.setdefault(kinds[type(v)], i)
    found = ", ".join(f"{k} (row {i}: {values[i]!r:.40})" for k, i in sorted(rows.items(), key=lambda kv: kv[1]))
    raise DataError(
        f"Column `{name}` mixes value types: {found}. Every value of a column must be of one type (all text, all "
        f"numbers, ...); convert them (e.g. [str(v) for v in column]), or fix the rows."
    )


def pixels(array: np.ndarray, what: str) -> np.ndarray:
    """An image array (or a stack of them) as ``uint8``: integers must lie in [0, 255] and floats in [0, 1] (they
    are scaled to 255), else a `DataError` that starts with ``what`` (e.g. "Image 3 in column `image`")."""
    kind = array.dtype.kind
    if kind in "biuf" and array.size:
        low, high = array.min(), array.max()
        top = 1.0 if kind == "f" else 255
        if np.isfinite(low) and np.isfinite(high) and 0 <= low and high <= top:
            return array.astype(np.uint8) if kind != "f" else np.round(array * 255).astype(np.uint8)
        found = f"dtype {array.dtype} with values in [{low:.4g}, {high:.4g}]"
    else:
        found = f"dtype {array.dtype}" if array.ndim else f"a {type(array.item()).__name__} ({array.item()!r:.60})"
    raise DataError(
        f"{what} has {found}, but images are uint8 in [0, 255] (or integers in that "
        "range) or floats in [0, 1]. Scale the images to one of these ranges (e.g. undo a normalisation), or pass "
        "the processed `pixel_values` (float32, [N, channels, height, width]) instead of images."
    )
