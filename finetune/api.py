"""`finetune.fit`: load (or take) a model, compile a recipe and train it, in one call."""

from __future__ import annotations

from typing import Annotated, Any

import pydantic

from finetune import schema
from finetune.model import Model
from finetune.schema import Callbacks, Count, Text, Verbose


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
      num_labels: Number of classes when loading by name (None: from the data or the checkpoint).
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

        model = load(model_or_name, task=task or "text-classification", num_labels=num_labels)
    model.compile(preset, **overrides)
    history = model.fit(train, validation_data, callbacks=callbacks, verbose=verbose, mesh=mesh)
    return model, history
