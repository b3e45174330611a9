"""LoRA: low-rank adapters on the ``nnx.Linear`` layers whose module path matches a regex.

An adapted layer computes ``x @ kernel + bias + dropout(x) @ lora_a @ lora_b * alpha / rank``. Its ``kernel`` and
``bias`` stay the same `nnx.Param` objects at the same paths, so the checkpoint tables keep loading and exporting
them. The adapter is flax's `nnx.LoRA` at ``<module>/lora``; its ``lora_a`` / ``lora_b`` are `nnx.LoRAParam` (a
subclass of `nnx.Param`), so rules select them by path (``.*/lora/lora_[ab]``) and the trainer gives them group
``lora``; the base weights fall into frozen groups and get neither gradients nor optimizer state. ``lora_b`` starts
at zero: an adapted model computes exactly what the base model computes until it trains.

Two exports: `merged` folds the adapters into the kernels (what ``save_pretrained`` writes), and `save_adapter`
writes only the adapters, in the format of the ``peft`` library.

Example:
  >>> model = finetune.load("sentence-transformers/all-MiniLM-L6-v2", task="text-classification", num_labels=2)
  >>> model.compile("lora", lora={"targets": r".*attention/(query|value)", "rank": 8})
  >>> model.fit(train, epochs=3)
  >>> model.save_adapter("out/adapter")          # peft.PeftModel.from_pretrained(base, "out/adapter")
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import jax.numpy as jnp
import numpy as np
import pydantic
import safetensors.numpy
from flax import nnx

from finetune import schema
from finetune.errors import ConfigError
from finetune.hf import tables
from finetune.models.dropout import Dropout
from finetune.models.layers import Linear
from finetune.params.rules import Group, path_str
from finetune.writer import write_directory

GROUP = "lora"
RULE = r"(?:.*/)?lora/lora_[ab]"
# While adapters train, the pretrained weights are frozen unless a recipe's groups say otherwise; fresh heads train.
GROUPS = {"backbone": Group(trainable=False), "head": Group(trainable=False), GROUP: Group()}
# PEFT's kaiming_uniform_(a=sqrt(5)) on A: a uniform bound of 1 / sqrt(fan_in).
_A_INIT = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
PEFT_TASKS = {
    "text-classification": "SEQ_CLS",
    "token-classification": "TOKEN_CLS",
    "causal-lm": "CAUSAL_LM",
    "feature-extraction": "FEATURE_EXTRACTION",
}


def _targets(value: Any) -> Any:
    return (value,) if isinstance(value, str) else value


# One regex or a list of them (kept as a tuple), each a valid pattern.
Targets = Annotated[
    tuple[schema.Regex, ...],
    pydantic.BeforeValidator(_targets),
    pydantic.Field(min_length=1),
    schema.allowed(
        "a regex or a non-empty list of regexes over module paths", "Write e.g. targets='.*attention/(query|value)'."
    ),
]


@schema.checked(what="the LoRA config")
class LoRAConfig:
    """Which layers get adapters, and their shape.

    Attributes:
      targets: Full-match regexes over module paths (``encoder/layers/0/attention/query``); every ``nnx.Linear`` a
        regex matches is adapted, and each regex must match at least one.
      rank: The adapters' inner dimension ``r``.
      alpha: The update is scaled by ``alpha / rank``.
      dropout: Dropout on the adapter's input while training.
    """

    targets: Targets
    rank: schema.Count = 8
    alpha: schema.Positive = 16.0
    dropout: schema.Fraction = 0.0

    @classmethod
    def from_mapping(cls, value: Mapping[str, Any] | LoRAConfig) -> LoRAConfig:
        """Reads a recipe's ``lora`` field, e.g. ``{"targets": ".*attention/(query|value)", "rank": 8}``."""
        if isinstance(value, LoRAConfig):
            return value
        if not isinstance(value, Mapping):
            fields = ", ".join(f.name for f in dataclasses.fields(cls))
            raise ConfigError(f"`lora` must be a dict with keys {fields}; received lora={value!r}.")
        return schema.check(cls, dict(value), name="lora")


class LoRALinear(Linear):
    """An ``nnx.Linear`` plus a scaled low-rank update: ``linear(x) + lora(dropout(x)) * alpha / rank``.

    It takes over the base layer's configuration and its ``kernel`` / ``bias`` variables (the same objects, so they
    keep their paths and values); the adapter is an `nnx.LoRA` with `nnx.LoRAParam` weights.

    Args:
      base: The layer to adapt.
      rank: Inner dimension of the adapter.
      alpha: Scale numerator (the update is multiplied by ``alpha / rank``).
      dropout: Dropout rate on the adapter's input.
      rngs: ``params`` initialises ``lora_a``; ``dropout`` drives the dropout.

    Example:
      >>> layer = LoRALinear(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), rank=2, alpha=4, dropout=0.0, rngs=nnx.Rngs(1))
      >>> layer.lora.lora_a.shape, layer.lora.lora_b.shape
      ((4, 2), (2, 3))
    """

    def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, dropout: float, rngs: nnx.Rngs):
        for name, value in vars(base).items():
            if not name.startswith("_"):
                setattr(self, name, value)
        names = base.kernel.get_metadata().get("out_sharding")  # the kernel's logical axes (in, out), if named
        a_axes = {"out_sharding": (names[0], None), "eager_sharding": False} if names else {}
        b_axes = {"out_sharding": (None, names[1]), "eager_sharding": False} if names else {}
        self.lora = nnx.LoRA(
            base.in_features,
            rank,
            base.out_features,
            dtype=base.dtype,
            param_dtype=base.kernel.get_value().dtype,
            a_initializer=_A_INIT,
            rngs=rngs,
            a_metadata=a_axes,
            b_metadata=b_axes,
        )
        self.lora_dropout = Dropout(dropout, rngs=rngs)
        self.rank, self.alpha = rank, alpha

    def project(self, inputs: Any, out_sharding: Any = None) -> Any:
        y = super().project(inputs, out_sharding=out_sharding)
        return y + self.lora(self.lora_dropout(inputs)) * (self.alpha / self.rank)

    def delta(self) -> Any:
        """The kernel update ``lora_a @ lora_b * alpha / rank``, in float32, shaped like the kernel."""
        a, b = (jnp.asarray(v.get_value(), jnp.float32) for v in (self.lora.lora_a, self.lora.lora_b))
        return a @ b * (self.alpha / self.rank)

    def merged(self) -> Linear:
        """A plain `finetune.models.layers.Linear` with the update folded into its kernel (this layer is left alone)."""
        linear = nnx.eval_shape(lambda: Linear(self.in_features, self.out_features, rngs=nnx.Rngs(0)))
        for name in [n for n in vars(linear) if not n.startswith("_")]:
            setattr(linear, name, getattr(self, name))
        kernel = self.kernel.get_value()
        linear.kernel = self.kernel.replace(value=(kernel.astype(jnp.float32) + self.delta()).astype(kernel.dtype))
        return linear


# --------------------------------------------------------------------------------------------------------------------
# Applying adapters
# --------------------------------------------------------------------------------------------------------------------


def adapted(module: nnx.Module) -> dict[str, LoRALinear]:
    """``{module path: layer}`` of every adapted layer in ``module``."""
    return {path_str(p): m for p, m in nnx.iter_modules(module) if isinstance(m, LoRALinear)}


def _linears(module: nnx.Module) -> dict[str, nnx.Linear]:
    return {path_str(p): m for p, m in nnx.iter_modules(module) if isinstance(m, nnx.Linear)}


def _replace(root: nnx.Module, path: str, new: nnx.Module) -> None:
    *parents, last = path.split("/")
    parent = root
    for part in parents:
        parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
    if last.isdigit():
        parent[int(last)] = new
    else:
        setattr(parent, last, new)


def _select(linears: Sequence[str], config: LoRAConfig) -> list[str]:
    """The module paths the targets match; one error naming every regex that matches no ``nnx.Linear``."""
    chosen, problems = [], []
    for pattern in config.targets:
        hits = [p for p in linears if re.fullmatch(pattern, p)]
        if not hits:
            near = [p for p in linears if re.search(pattern, p)][:5] or difflib.get_close_matches(
                pattern, list(linears), n=5, cutoff=0.3
            )
            shown = ", ".join(near) if near else ", ".join(list(linears)[:5])
            problems.append(f"{pattern!r} (near misses: {shown})" if near else f"{pattern!r} (Linear layers: {shown})")
        chosen += [p for p in hits if p not in chosen]
    if problems:
        raise ConfigError(
            "These `lora.targets` match no nnx.Linear module (the regex must fully match a module path such as "
            f"'encoder/layers/0/attention/query'): {'; '.join(problems)}. Fix the regex, e.g. '.*attention/(query|"
            "value)'."
        )
    return chosen


def apply(model: Any, config: Mapping[str, Any] | LoRAConfig, *, seed: int = 0) -> list[str]:
    """Adds adapters to the ``nnx.Linear`` layers of ``model.module`` whose paths match ``config.targets``.

    Applying the same configuration again does nothing, so the trainer can call it for every phase.

    Args:
      model: A `finetune.Model`; its module is changed in place.
      config: A `LoRAConfig` or the recipe's ``lora`` dict (``targets``, ``rank``, ``alpha``, ``dropout``).
      seed: Seeds the initialisation of ``lora_a`` and the adapters' dropout.

    Returns:
      The module paths of the adapted layers.

    Raises:
      ConfigError: A target regex that matches no ``nnx.Linear`` (with near misses), or a model already adapted
        with other settings.

    Example:
      >>> finetune.params.lora.apply(model, {"targets": r".*mlp/.*", "rank": 16, "alpha": 32})
      ['layers/0/mlp/gate_proj', 'layers/0/mlp/up_proj', ...]
    """
    config = LoRAConfig.from_mapping(config)
    linears = _linears(model.module)
    paths = _select(list(linears), config)
    existing = adapted(model.module)
    if existing:
        same = sorted(existing) == sorted(paths) and all(
            (m.rank, m.alpha, m.lora_dropout.rate) == (config.rank, config.alpha, config.dropout)
            for m in existing.values()
        )
        if not same:
            raise ConfigError(
                f"The model already has LoRA adapters on {len(existing)} layer(s) with other settings than "
                f"lora={dataclasses.asdict(config)}. Load the model again to adapt it differently."
            )
        return paths
    rngs = nnx.Rngs(seed)  # one stream: lora_a draws and dropout masks never reuse a key
    for path in paths:
        layer = LoRALinear(linears[path], rank=config.rank, alpha=config.alpha, dropout=config.dropout, rngs=rngs)
        _replace(model.module, path, layer)
    model._infer = None  # the model's cached inference function was traced for the old structure
    return paths


def plan_defaults(module: nnx.Module, rules: Sequence[tuple]) -> tuple[list[tuple], dict[str, Group]]:
    """The rules and default groups of a module with adapters: `RULE` -> ``lora`` first, base frozen (`GROUPS`).

    A module without adapters gets its rules back unchanged; rules that already name the ``lora`` group are kept
    as they are (with the default groups).
    """
    if not adapted(module):
        return list(rules), {}
    if any(target == GROUP for _, target in rules):
        return list(rules), dict(GROUPS)
    return [(RULE, GROUP), *rules], dict(GROUPS)


def merged(module: nnx.Module) -> nnx.Module:
    """A copy of ``module`` with every adapter folded into its kernel; ``module`` itself is not changed.

    The copy shares the arrays of every other parameter (they are immutable), so it costs only the merged kernels.

    Example:
      >>> export_weights(merged(model.module), table)   # what save_pretrained writes
    """
    layers = adapted(module)
    if not layers:
        return module
    copy = nnx.merge(*nnx.split(module))  # new module objects over the same variables
    for path, layer in adapted(copy).items():
        _replace(copy, path, layer.merged())
    return copy


# --------------------------------------------------------------------------------------------------------------------
# The PEFT format
# --------------------------------------------------------------------------------------------------------------------


def _hf_key(table: Sequence[Any], path: str) -> tuple[str, Any, tuple[str, ...]] | None:
    """``(checkpoint key, row, the row's parameter paths)`` that exports ``path``, or None (first row wins)."""
    return tables.key_for(tables.rows(table), path)


def _module_name(key: str) -> str:
    return key.rsplit(".", 1)[0]


def _target_names(adapted_names: Sequence[str], linear_names: Sequence[str]) -> list[str]:
    """PEFT ``target_modules``: the last name parts (``["query", "value"]``) when they select exactly the adapted
    modules, else every adapted module's full name."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in adapted_names})
    if {n for n in linear_names if n.rsplit(".", 1)[-1] in suffixes} == set(adapted_names):
        return suffixes
    return sorted(adapted_names)


def _adapter_tensors(layers: Mapping[str, LoRALinear], table: Sequence[Any]) -> tuple[dict, list[str]]:
    """PEFT's ``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)`` of every adapted layer, and their module names."""
    tensors, names, problems = {}, [], []
    for path, layer in layers.items():
        found = _hf_key(table, f"{path}/kernel")
        if found is None or len(found[1].paths) > 1 or found[1].transform != tables.TRANSPOSE:
            problems.append(path)
            continue
        name = _module_name(found[0])
        a, b = (np.asarray(v.get_value(), np.float32) for v in (layer.lora.lora_a, layer.lora.lora_b))
        tensors[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
        names.append(name)
    if problems:
        raise ConfigError(
            f"These adapted layers have no single transposed nn.Linear weight in the Hugging Face checkpoint (a fused "
            f"or reshaped tensor), so PEFT cannot load adapters for them: {', '.join(problems)}. Target other layers, "
            "or export the merged model with save_pretrained."
        )
    return tensors, names


# The module names PEFT itself adds to ``modules_to_save`` for these task types (``PeftModelForSequenceClassification``,
# ``...ForTokenClassification``): it wraps them whether or not the adapter trained them, and reads their weights from
# the adapter file, so those weights must be there (the pretrained ones when the head stayed frozen).
PEFT_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score")}


def _wrapped(names: set[str], requested: set[str]) -> set[str]:
    """The modules PEFT wraps for ``modules_to_save=requested``: every module name ending with one of them (PEFT
    matches plain string suffixes, so ``classifier`` also wraps ``pre_classifier``), outermost only, since a
    wrapper holds its submodules whole."""
    matched = {n for n in names if any(n.endswith(r) for r in requested)}
    return {n for n in matched if not any(n.startswith(f"{m}.") for m in matched)}


def _saved_modules(
    module: nnx.Module, table: Sequence[Any], trainable: set[str], task_type: str | None
) -> tuple[dict, list[str]]:
    """PEFT's ``modules_to_save``: the Hugging Face modules that own a trainable non-adapter parameter (a new or
    trained head), and those PEFT adds by itself for the task type (`PEFT_HEADS`), as the outermost modules PEFT
    wraps; with the tensors of everything under them, stored whole."""
    params = {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    keys = {p: _hf_key(table, p) for p in params if not isinstance(params[p], nnx.LoRAParam)}
    owners = {_module_name(keys[p][0]) for p in trainable if keys.get(p) is not None}
    exported = {k[0]: k for k in keys.values() if k is not None}
    names = {".".join(key.split(".")[:i]) for key in exported for i in range(1, key.count(".") + 1)}
    wrapped = _wrapped(names, owners | set(PEFT_HEADS.get(task_type, ())))
    tensors = {}
    for key, row, paths in exported.values():
        if any(key.startswith(f"{m}.") for m in wrapped):
            arrays = [np.asarray(params[p].get_value()) for p in paths]
            tensors[f"base_model.model.{key}"] = np.ascontiguousarray(row.transform.inverse(arrays))
    return tensors, sorted(wrapped)


def save_adapter(model: Any, directory: str | Path, *, trainable: set[str] | None = None) -> Path:
    """Writes the adapters in PEFT's format: ``adapter_config.json`` and ``adapter_model.safetensors``.

    ``peft.PeftModel.from_pretrained(base, directory)`` then puts them on the transformers base model. Trained
    parameters outside the adapters (a new classifier) are saved whole as PEFT's ``modules_to_save``.

    Args:
      model: A `finetune.Model` loaded with `finetune.load`, with adapters.
      directory: New, empty, or an earlier adapter export (replaced atomically, as `finetune.writer` describes); a
        directory holding other files is refused.
      trainable: Parameter paths that trained; default: the trainable groups of the model's current plan.

    Returns:
      The directory, as a `pathlib.Path`.

    Example:
      >>> model.save_adapter("out/adapter")
      >>> peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), "out/adapter")
    """
    layers = adapted(model.module)
    if model.architecture is None or not layers:
        raise ConfigError(
            "save_adapter needs a model loaded with finetune.load and adapted with LoRA (compile with preset 'lora' "
            "or 'lora-sft', or a `lora` recipe field). Use save_pretrained to export a model without adapters."
        )
    if trainable is None:
        from finetune.recipe import Recipe
        from finetune.training.loop import plan

        assignment = plan(model, model.recipe or Recipe())
        trainable = {p for p in assignment.group_of if assignment.trainable(p)}
    table = model.architecture.table(model.architecture.config_from_hf(model.hf_config), model.task)
    tensors, names = _adapter_tensors(layers, table)
    task_type = PEFT_TASKS.get(model.task)
    head, saved = _saved_modules(model.module, table, trainable, task_type)
    linears = [_hf_key(table, f"{p}/kernel") for p in _linears(model.module)]
    first = next(iter(layers.values()))
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": model.source,
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": first.lora_dropout.rate,
        "target_modules": _target_names(names, [_module_name(k[0]) for k in linears if k is not None]),
        "modules_to_save": saved or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
    }

    def fill(out: Path) -> None:
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
        safetensors.numpy.save_file({**tensors, **head}, str(out / "adapter_model.safetensors"), {"format": "pt"})

    return write_directory(directory, fill, kind="adapter")
