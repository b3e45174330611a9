"""`finetune.fit`: load (or take) a model, compile a recipe and train it, in one call."""

from __future__ import annotations

from typing import Annotated, Any

import pydantic

from finetune import schema
from finetune.model import Model
from finetune.schema import Count, Text, Verbose
from finetune.training.callbacks import Callbacks


def _model_or_name(value: Any) -> Any:
    if isinstance(value, Model):
        return value
    try:
        return schema.validate_as(schema.Source, value)
    except pydantic.ValidationError:
        raise schema.violation(
            "a finetune.Model, a Hub id or a local directory", "Pass e.g. 'sentence-transformers/all-MiniLM-L6-v2'."
        ) from None


ModelOrName = Annotated[Any, pydantic.AfterValidator(_model_or_name)]


@schema.arguments
def fit(
    model_or_name: ModelOrName,
    train: Any,
    *,
    task: Text | None = None,
    preset: Text | None = None,
    validation_data: Any = None,
    num_labels: Count | None = None,
    callbacks: Callbacks = (),
    verbose: Verbose = 1,
    mesh: Any = None,
    **overrides: Any,
):
    """Fine-tunes in one call; returns ``(model, history)``.

    Args:
      model_or_name: A `finetune.Model`, or a Hub id / local directory to `finetune.load`.
      train: Training data (see `Model.fit`).
      task: The task when loading by name.
      preset: A recipe name; None uses the `finetune.Recipe` defaults.
      validation_data: Evaluated after every epoch.
      num_labels: Number of classes when loading by name. None takes them from ``train``: the names of a
        ``ClassLabel`` feature, else the sorted distinct label strings as names, else ``max + 1`` for class ids, and
        one output (regression) for non-integer float labels; data whose labels cannot be seen before batching
        (ready batches) keeps the checkpoint's labels (see `finetune.data.labels.from_data`).
      callbacks: Callbacks for `Model.fit`.
      verbose: 0 is silent.
      mesh: Spread training over devices (see `Model.fit`).
      **overrides: Recipe fields (``learning_rate``, ``epochs``, ``batch_size``...).

    Example:
      >>> model, history = finetune.fit("bert-base-uncased", ds, task="text-classification", preset="full", epochs=3)
    """
    if isinstance(model_or_name, Model):
        model = model_or_name
    else:
        from finetune.loading import load

        task = task or "text-classification"
        id2label = None
        if num_labels is None:
            num_labels, names = _labels_from_data(train, task, preset, overrides)
            id2label = dict(enumerate(names)) if names else None
        model = load(model_or_name, task=task, num_labels=num_labels, id2label=id2label)
    model.compile(preset, **overrides)
    history = model.fit(train, validation_data, callbacks=callbacks, verbose=verbose, mesh=mesh)
    return model, history


def _labels_from_data(train: Any, task: str, preset: str | None, overrides: dict) -> tuple[int | None, list | None]:
    """``(num_labels, names)`` from the training data, its label column found with the recipe's ``columns``."""
    from finetune.data import labels

    columns = overrides.get("columns")
    if columns is None and preset is not None:
        from finetune import presets

        columns = presets.get(preset).columns
    return labels.from_data(train, task, columns)
