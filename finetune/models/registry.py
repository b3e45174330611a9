"""`config.model_type` -> architecture: a dict, never an if/elif chain.

Each architecture lives in its own folder (`finetune/models/<name>/`) with `modeling.py` (a frozen config dataclass
built from the HF config, and the backbone, made of `finetune.models.blocks`, with its heads from
`finetune.models.heads`) and `convert.py` (the checkpoint-key <-> NNX-path table). Its `__init__.py` exposes one
`ARCHITECTURE` object of the type below. An architecture folder imports only these shared modules and its own files.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flax import nnx

from finetune.errors import LoadError
from finetune.models.heads import Heads, head_pattern


@dataclasses.dataclass(frozen=True)
class ConfigRules:
    """The structure an architecture's config must have, as data, checked before anything is built or read.

    Field names are those of the config (``config.json``). A field that is absent is left to transformers' default;
    one that is present must have the kind listed. transformers accepts many configs its own modules cannot run (a
    width that the heads do not divide fails later in a reshape), so these rules are what the modules need.

    Attributes:
      sizes: Positive integers (``vocab_size``, ``num_attention_heads``...).
      optional_sizes: Positive integers, or null where the config derives the value (``head_dim``, ``n_inner``).
      pairs: A positive integer or a pair of them (``image_size``, ``patch_size``).
      rates: Numbers in [0, 1], or null (dropout probabilities).
      positive: Finite numbers above 0 (layer-norm epsilons).
      divides: ``(field, divisor)`` pairs: ``divisor`` (a field name or an integer) divides ``field``.
    """

    sizes: tuple[str, ...] = ()
    optional_sizes: tuple[str, ...] = ()
    pairs: tuple[str, ...] = ()
    rates: tuple[str, ...] = ()
    positive: tuple[str, ...] = ()
    divides: tuple[tuple[str, str | int], ...] = ()


_ABSENT = object()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _kind_problem(rules: ConfigRules, name: str, value: Any) -> str | None:
    """What ``value`` of field ``name`` should be, if it is not; None if it fits."""
    if name in rules.sizes or name in rules.optional_sizes:
        if (value is None and name in rules.optional_sizes) or (_is_int(value) and value > 0):
            return None
        return "a positive integer" + (" (or null)" if name in rules.optional_sizes else "")
    if name in rules.pairs:
        values = list(value) if isinstance(value, list | tuple) and len(value) == 2 else [value]
        return None if all(_is_int(v) and v > 0 for v in values) else "a positive integer or a pair of them"
    if name in rules.rates:
        return None if value is None or (_is_number(value) and 0 <= value <= 1) else "a number from 0 to 1 (or null)"
    if name in rules.positive:
        return None if _is_number(value) and value > 0 else "a finite number above 0"
    return None


CHECKPOINT_FIX = "Fix the config: it must hold the values the checkpoint was trained with."


def check_config(
    arch: Architecture, config: Any, where: str, error: type[Exception] = LoadError, fix: str = CHECKPOINT_FIX
) -> None:
    """Checks ``config`` (a ``config.json`` mapping or a transformers config object) against ``arch.config_rules``.

    Args:
      arch: The architecture whose rules apply.
      config: The raw ``config.json`` (a mapping: absent fields are skipped) or a `transformers.PretrainedConfig`.
      where: Where the config comes from, for the message (e.g. "`config.json` in ./model").
      error: The exception class to raise (`LoadError` for a checkpoint's config, `ConfigError` for an argument).
      fix: The message's last sentence: how to fix it.

    Raises:
      error: Naming the first field that is not of its kind, or both fields of a divisibility that fails.
    """
    rules = arch.config_rules

    def get(name: str) -> Any:
        return config.get(name, _ABSENT) if isinstance(config, Mapping) else getattr(config, name, _ABSENT)

    names = (*rules.sizes, *rules.optional_sizes, *rules.pairs, *rules.rates, *rules.positive)
    for name in names:
        value = get(name)
        problem = None if value is _ABSENT else _kind_problem(rules, name, value)
        if problem:
            raise error(
                f"`{name}` in {where} must be {problem}; received {name}={value!r} ({type(value).__name__}). {fix}"
            )
    for name, divisor in rules.divides:
        value, by = get(name), (get(divisor) if isinstance(divisor, str) else divisor)
        if not (_is_int(value) and _is_int(by)) or value % by == 0:
            continue
        named = isinstance(divisor, str)
        received = f"{name}={value} and {divisor}={by}" if named else f"{name}={value}"
        raise error(
            f"`{name}` in {where} must be a multiple of {f'`{divisor}`' if named else by}; received {received} "
            f"({value} / {by} = {value / by:g}, not a whole number), so the {arch.name} modules cannot split it "
            f"evenly. {fix}"
        )


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What the shared loader needs to know about one family of models.

    Attributes:
      name: Short name, e.g. ``"bert"``.
      heads: Its task heads (`finetune.models.heads.Heads`): the tasks it supports (a subset of
        `finetune.models.heads.TASKS`), and from them the `head` rule.
      config_from_hf: ``transformers.PretrainedConfig -> Config`` (a frozen dataclass of the fields the modules use).
      build: ``build(config, *, task, num_labels, dtype, param_dtype, rngs) -> nnx.Module``. The module's ``__call__``
        takes Hugging Face argument names as keywords (``input_ids``, ``attention_mask``, ``token_type_ids``,
        ``pixel_values`` in NCHW) and returns logits (hidden states for ``feature-extraction``).
      table: ``table(config, task) -> Sequence[weights.Row]``, the checkpoint key <-> NNX path mapping.
      ignore: ``ignore(config, task) -> Sequence[str]``, full-match regexes of checkpoint keys that may go unused for
        this task (e.g. a masked-LM head when fine-tuning a classifier).
      stack: The path of the layer stack (``encoder/layers``, ``layers``), whose entries are the layers.
      num_layers: ``num_layers(config) -> int``.
      hf_architecture: ``hf_architecture(config, task) -> str``, the transformers class name written to config.json.
      config_rules: The structure its config must have (`ConfigRules`), checked by `check_config`.
    """

    name: str
    heads: Heads
    config_from_hf: Callable[[Any], Any]
    build: Callable[..., nnx.Module]
    table: Callable[[Any, str], Sequence[Any]]
    ignore: Callable[[Any, str], Sequence[str]]
    stack: str
    num_layers: Callable[[Any], int]
    hf_architecture: Callable[[Any, str], str]
    config_rules: ConfigRules = ConfigRules()

    @property
    def tasks(self) -> tuple[str, ...]:
        """The task names this architecture supports."""
        return tuple(self.heads.tasks)

    @property
    def head(self) -> str:
        """Full-match regex over NNX paths of the task heads (and pooler). Head parameters missing from the checkpoint
        are initialised fresh and put in group ``new``; present ones go to group ``head``; the rest is ``backbone``."""
        return head_pattern(self.heads)

    @property
    def layer(self) -> str:
        """Full-match regex over NNX paths whose group 1 is the layer index (for layer-wise LR decay)."""
        return rf"{self.stack}/(\d+)/.*"


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
