"""Parameter-group assignment, pure: the model's parameter paths and a recipe in, an `Assignment` out.

Nothing here changes the model: a recipe's LoRA adapters are added beforehand, as a step of their own
(`finetune.params.lora.apply`, through `finetune.Model.add_adapters`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from flax import nnx

from finetune.errors import ConfigError
from finetune.params import lora
from finetune.params.rules import DEFAULT_GROUPS, Assignment, LayerDecay, assign, flatten


def assignment(
    paths: Iterable[str],
    recipe: Any,
    *,
    rules: Sequence[tuple],
    layer_pattern: str | None = None,
    num_layers: int | None = None,
) -> Assignment:
    """The group of every path under ``recipe`` (a `finetune.Recipe`, or None: the defaults).

    ``rules``, ``layer_pattern`` and ``num_layers`` are the model's defaults (`finetune.Model`). Paths of LoRA
    adapters (``.../lora/lora_a``) go to group ``lora`` and the pretrained weights default to frozen groups
    (`finetune.params.lora.plan_defaults`).
    """
    paths = list(paths)
    chosen = recipe.rules if recipe is not None and recipe.rules is not None else rules
    if recipe is not None and recipe.layer_decay is not None:
        chosen = layer_decay_rules(rules, recipe, layer_pattern=layer_pattern, num_layers=num_layers)
    chosen, lora_groups = lora.plan_defaults(paths, chosen)
    groups = {**DEFAULT_GROUPS, **lora_groups, **((recipe.groups if recipe is not None else None) or {})}
    return assign(paths, chosen, groups)


def of_model(model: Any, recipe: Any) -> Assignment:
    """`assignment` over the parameter paths of ``model.module`` and the model's default rules and layers."""
    return assignment(
        parameter_paths(model.module),
        recipe,
        rules=model.rules,
        layer_pattern=model.layer_pattern,
        num_layers=model.num_layers,
    )


def parameter_paths(module: nnx.Module) -> list[str]:
    """Every ``nnx.Param`` path of ``module`` (``encoder/layers/0/attention/query/kernel``)."""
    return list(flatten(nnx.to_pure_dict(nnx.state(module, nnx.Param))))


def layer_decay_rules(
    rules: Sequence[tuple], recipe: Any, *, layer_pattern: str | None, num_layers: int | None
) -> list:
    """The model's ``new`` / ``head`` rules, then layer i of L at ``decay ** (L - i)``, the rest (embeddings) lowest."""
    if recipe.rules is not None:
        raise ConfigError(
            "`layer_decay` applies to the model's default rules, and custom `rules` were given too. Put "
            "finetune.LayerDecay(decay, num_layers) targets in your rules instead of setting `layer_decay`."
        )
    if not layer_pattern or not num_layers:
        raise ConfigError(
            f"`layer_decay`={recipe.layer_decay} needs to know the model's layers, and this model declares none. "
            "Pass Model(..., layer_pattern=r'encoder/layers/(\\d+)/.*', num_layers=L), or write LayerDecay rules."
        )
    decay, layers = recipe.layer_decay, num_layers
    kept = [r for r in rules if r[1] in ("new", "head")]
    return [*kept, (layer_pattern, LayerDecay(decay, layers)), (".*", LayerDecay(decay, layers, layer=-1))]
