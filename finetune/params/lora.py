"""LoRA: low-rank adapters on the ``nnx.Linear`` layers whose module path matches a regex.

An adapted layer computes ``x @ kernel + bias + dropout(x) @ lora_a @ lora_b * alpha / rank``. Its ``kernel`` and
``bias`` stay the same `nnx.Param` objects at the same paths, so the checkpoint tables keep loading and exporting
them. The adapter is flax's `nnx.LoRA` at ``<module>/lora``; its ``lora_a`` / ``lora_b`` are `nnx.LoRAParam` (a
subclass of `nnx.Param`), so rules select them by path (``.*/lora/lora_[ab]``) and the trainer gives them group
``lora``; the base weights fall into frozen groups and get neither gradients nor optimizer state. ``lora_b`` starts
at zero: an adapted model computes exactly what the base model computes until it trains.

`merged` folds the adapters into the kernels (what ``save_pretrained`` writes); `finetune.params.peft` writes only
the adapters, in the format of the ``peft`` library.

Example:
  >>> model = finetune.load("sentence-transformers/all-MiniLM-L6-v2", task="text-classification", num_labels=2)
  >>> model.compile("lora", lora={"targets": r".*attention/(query|value)", "rank": 8})
  >>> model.fit(train, epochs=3)
  >>> model.save_adapter("out/adapter")          # peft.PeftModel.from_pretrained(base, "out/adapter")
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import jax.numpy as jnp
import pydantic
from flax import nnx

from finetune import schema
from finetune.errors import ConfigError
from finetune.models.blocks import Dropout, Linear
from finetune.params.rules import Group, path_str

GROUP = "lora"
RULE = r"(?:.*/)?lora/lora_[ab]"
# While adapters train, the pretrained weights are frozen unless a recipe's groups say otherwise; fresh heads train.
GROUPS = {"backbone": Group(trainable=False), "head": Group(trainable=False), GROUP: Group()}
# PEFT's kaiming_uniform_(a=sqrt(5)) on A: a uniform bound of 1 / sqrt(fan_in).
_A_INIT = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


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
        """A plain `finetune.models.blocks.Linear` with the update folded into its kernel (this layer is left alone)."""
        linear = nnx.eval_shape(lambda: Linear(self.in_features, self.out_features, rngs=nnx.Rngs(0)))
        for name in [n for n in vars(linear) if not n.startswith("_")]:
            setattr(linear, name, getattr(self, name))
        kernel = self.kernel.get_value()
        # flax types Variable.replace as returning a Variable; it returns the Param's own type
        new = self.kernel.replace(value=(kernel.astype(jnp.float32) + self.delta()).astype(kernel.dtype))
        linear.kernel = new  # type: ignore[assignment]
        return linear


# --------------------------------------------------------------------------------------------------------------------
# Applying adapters
# --------------------------------------------------------------------------------------------------------------------


def adapted(module: nnx.Module) -> dict[str, LoRALinear]:
    """``{module path: layer}`` of every adapted layer in ``module``."""
    return {path_str(p): m for p, m in nnx.iter_modules(module) if isinstance(m, LoRALinear)}


def linears(module: nnx.Module) -> dict[str, nnx.Linear]:
    return {path_str(p): m for p, m in nnx.iter_modules(module) if isinstance(m, nnx.Linear)}


def _replace(root: nnx.Module, path: str, new: nnx.Module) -> None:
    *parents, last = path.split("/")
    parent: Any = root  # a module, or a list / dict of modules inside one
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


def apply(module: nnx.Module, config: Mapping[str, Any] | LoRAConfig, *, seed: int = 0) -> list[str]:
    """Adds adapters to the ``nnx.Linear`` layers of ``module`` whose paths match ``config.targets``.

    Applying the same configuration again does nothing, so the trainer can call it for every phase. A
    `finetune.Model` adds them with `finetune.Model.add_adapters`, which also drops what it traced for the old
    structure.

    Args:
      module: An NNX module; it is changed in place.
      config: A `LoRAConfig` or the recipe's ``lora`` dict (``targets``, ``rank``, ``alpha``, ``dropout``).
      seed: Seeds the initialisation of ``lora_a`` and the adapters' dropout.

    Returns:
      The module paths of the adapted layers.

    Raises:
      ConfigError: A target regex that matches no ``nnx.Linear`` (with near misses), or a model already adapted
        with other settings.

    Example:
      >>> finetune.params.lora.apply(model.module, {"targets": r".*mlp/.*", "rank": 16, "alpha": 32})
      ['layers/0/mlp/gate_proj', 'layers/0/mlp/up_proj', ...]
    """
    config = LoRAConfig.from_mapping(config)
    layers = linears(module)
    paths = _select(list(layers), config)
    existing = adapted(module)
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
        layer = LoRALinear(layers[path], rank=config.rank, alpha=config.alpha, dropout=config.dropout, rngs=rngs)
        _replace(module, path, layer)
    return paths


def plan_defaults(paths: Sequence[str], rules: Sequence[tuple]) -> tuple[list[tuple], dict[str, Group]]:
    """The rules and default groups of a module with adapters: `RULE` -> ``lora`` first, base frozen (`GROUPS`).

    Parameter ``paths`` without adapters (none matching `RULE`) get their rules back unchanged; rules that already
    name the ``lora`` group are kept as they are (with the default groups).
    """
    if not any(re.fullmatch(RULE, p) for p in paths):
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
