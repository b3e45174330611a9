"""ViT and DeiT image encoders (``model_type`` ``vit`` and ``deit``): feature extraction and image classification."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from finetune.errors import ConfigError
from finetune.models.registry import Architecture
from finetune.models.vit import convert
from finetune.models.vit.modeling import ViT, Config

TASKS = ("feature-extraction", "image-classification")


def build(
    config: Config,
    *,
    task: str,
    num_labels: int | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
) -> ViT:
    """Builds the ViT for ``task``: the backbone alone, or with a ``num_labels``-way classifier."""
    if task not in TASKS:
        raise ConfigError(f"ViT supports the tasks {', '.join(TASKS)}; received task={task!r}. Pick one of these.")
    if task == "image-classification" and not num_labels:
        raise ConfigError(
            f"`num_labels` must be a positive integer for image-classification; received num_labels={num_labels!r}. "
            "Pass the number of classes."
        )
    labels = num_labels if task == "image-classification" else None
    return ViT(config, num_labels=labels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def hf_architecture(config: Config, task: str) -> str:
    """The transformers class that loads an export of this model."""
    family = "DeiT" if config.model_type == "deit" else "ViT"
    return f"{family}ForImageClassification" if task == "image-classification" else f"{family}Model"


ARCHITECTURE = Architecture(
    name="vit",
    tasks=TASKS,
    config_from_hf=Config.from_hf,
    build=build,
    table=convert.table,
    ignore=convert.ignore,
    head=r"classifier/.*",
    layer=r"encoder/layers/(\d+)/.*",
    num_layers=lambda config: config.num_layers,
    hf_architecture=hf_architecture,
)
