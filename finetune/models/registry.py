"""`config.model_type` -> architecture: a dict, never an if/elif chain.

Each architecture lives in its own folder (`finetune/models/<name>/`) with `modeling.py` (a frozen config dataclass
built from the HF config, and the NNX modules) and `convert.py` (the checkpoint-key <-> NNX-path table). Its
`__init__.py` exposes one `ARCHITECTURE` object of the type below.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import Any

from flax import nnx

from finetune.errors import LoadError

TASKS = ("text-classification", "token-classification", "image-classification", "causal-lm", "feature-extraction")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What the shared loader needs to know about one family of models.

    Attributes:
      name: Short name, e.g. ``"bert"``.
      tasks: The task names this architecture supports (a subset of `TASKS`).
      config_from_hf: ``transformers.PretrainedConfig -> Config`` (a frozen dataclass of the fields the modules use).
      build: ``build(config, *, task, num_labels, dtype, param_dtype, rngs) -> nnx.Module``. The module's ``__call__``
        takes Hugging Face argument names as keywords (``input_ids``, ``attention_mask``, ``token_type_ids``,
        ``pixel_values`` in NCHW) and returns logits (hidden states for ``feature-extraction``).
      table: ``table(config, task) -> Sequence[weights.Row]``, the checkpoint key <-> NNX path mapping.
      ignore: ``ignore(config, task) -> Sequence[str]``, full-match regexes of checkpoint keys that may go unused for
        this task (e.g. a masked-LM head when fine-tuning a classifier).
      head: Full-match regex over NNX paths of the task head (and pooler). Head parameters missing from the checkpoint
        are initialised fresh and put in group ``new``; present ones go to group ``head``; the rest is ``backbone``.
      layer: Full-match regex over NNX paths whose group 1 is the transformer layer index (for layer-wise LR decay).
      num_layers: ``num_layers(config) -> int``.
      hf_architecture: ``hf_architecture(config, task) -> str``, the transformers class name written to config.json.
    """

    name: str
    tasks: tuple[str, ...]
    config_from_hf: Callable[[Any], Any]
    build: Callable[..., nnx.Module]
    table: Callable[[Any, str], Sequence[Any]]
    ignore: Callable[[Any, str], Sequence[str]]
    head: str
    layer: str
    num_layers: Callable[[Any], int]
    hf_architecture: Callable[[Any, str], str]


# model_type -> module that defines ARCHITECTURE. Imported lazily so that `import finetune` stays cheap.
REGISTRY: dict[str, str] = {
    "bert": "finetune.models.bert",
    "roberta": "finetune.models.roberta",
    "xlm-roberta": "finetune.models.roberta",
    "distilbert": "finetune.models.distilbert",
    "vit": "finetune.models.vit",
    "deit": "finetune.models.vit",
    "gpt2": "finetune.models.gpt2",
    "llama": "finetune.models.llama",
    "mistral": "finetune.models.llama",
    "qwen2": "finetune.models.llama",
    "qwen3": "finetune.models.llama",
}


def get(model_type: str) -> Architecture:
    """Returns the architecture registered for a Hugging Face ``config.model_type``."""
    if model_type not in REGISTRY:
        raise LoadError(
            f"The checkpoint's `model_type` is {model_type!r}, which finetune does not support. "
            f"Supported model types: {', '.join(sorted(REGISTRY))}. Pick a checkpoint of one of these architectures."
        )
    return importlib.import_module(REGISTRY[model_type]).ARCHITECTURE
