"""finetune: Keras-style fine-tuning of Hugging Face models in JAX (Flax NNX + Optax + Orbax).

Importing it changes nothing outside finetune; ``ft.tune()`` is the CPU tuning, as one explicit call.

Example:
  >>> import finetune as ft
  >>> ft.tune()  # before JAX starts: XLA's plain scheduler, synchronous dispatch, kept scratch, compile cache
  >>> model = ft.load("sentence-transformers/all-MiniLM-L6-v2", task="text-classification", num_labels=2)
  >>> model.compile(preset="discriminative", learning_rate=3e-5)
  >>> history = model.fit(train, validation_data=test, epochs=3, batch_size=32)
"""

from finetune import callbacks, presets
from finetune.api import fit
from finetune.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ExportError,
    FinetuneError,
    HubError,
    LoadError,
    NonFiniteError,
    RulesError,
)
from finetune.loading import from_config, load
from finetune.model import Model
from finetune.params.rules import DEFAULT_GROUPS, Group, LayerDecay
from finetune.recipe import Recipe
from finetune.runtime import tune
from finetune.training.history import History

__all__ = [
    "DEFAULT_GROUPS",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ExportError",
    "FinetuneError",
    "Group",
    "History",
    "HubError",
    "LayerDecay",
    "LoadError",
    "Model",
    "NonFiniteError",
    "Recipe",
    "RulesError",
    "callbacks",
    "presets",
    "fit",
    "from_config",
    "load",
    "tune",
]
