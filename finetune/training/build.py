"""Building a `Program` and its state: the model split by trainable groups, the optimizer over the trainable
parameters, the compute dtype and rematerialisation applied, every array placed on its devices."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from finetune import metrics as metrics_lib
from finetune import optim
from finetune import sharding as sharding_lib
from finetune.errors import ConfigError
from finetune.params.rules import Assignment, decay_mask, flatten
from finetune.training.step import Program, split
from finetune.training.tasks import kind, loss_fn, model_inputs


def program(
    model: Any,
    recipe: Any,
    assignment: Assignment,
    sample: dict,
    *,
    layout: Any,
    total_steps: int | None,
    train: bool = True,
    predicting: bool = False,
) -> tuple[Program, dict, dict, str]:
    """``(program, state, schedules, label family)`` for batches shaped like ``sample`` (the steps not yet compiled).

    ``predicting``: for `predict` alone, which models without a loss (feature extraction) may serve too."""
    trainable = {p for p in assignment.group_of if assignment.trainable(p)}
    if train and not trainable:
        raise ConfigError("Every parameter group is frozen (trainable=False), so there is nothing to train.")
    graphdef, eval_graphdef, params, frozen, rest = split(model.module, trainable)
    if recipe.precision == "bfloat16":
        graphdef, eval_graphdef = (
            _with_attributes(g, params, frozen, rest, dtype=jnp.bfloat16) for g in (graphdef, eval_graphdef)
        )
    if recipe.remat:  # each layer of the stack recomputed in the backward pass (train step only)
        graphdef = _with_attributes(graphdef, params, frozen, rest, remat=True)
    tx: optim.SkipNonfinite | None = None
    schedules: dict = {}
    if train:
        decay = decay_mask(flatten(params), recipe.decay_rules)
        tx, schedules = optim.build(assignment, decay, recipe.optimizer_spec(), total_steps=total_steps)
    logits = jax.eval_shape(lambda: nnx.merge(eval_graphdef, params, frozen, rest)(**_inputs(sample)))
    names: Sequence[str | metrics_lib.Metric]
    if predicting and model.task == "feature-extraction":  # no loss: a program with no metrics
        family, names = "features", ()
    else:
        family = kind(model.task, logits.shape, sample.get("labels"))
        names = recipe.metrics or metrics_lib.DEFAULT_METRICS[family]
    loss = loss_fn(model.task, recipe.loss)
    built = Program(graphdef, eval_graphdef, tx, loss, metrics_lib.resolve(names), int(logits.shape[-1]))
    return built, _init_state(built, model, sample, (params, frozen, rest), layout), schedules, family


def _init_state(built: Program, model: Any, sample: dict, trees: tuple, layout: Any) -> dict:
    """The program's state; with a mesh, every array placed by its logical axes (finetune/sharding.py)."""
    params, frozen, rest = trees
    shardings = None
    if layout is not None:
        layout.check_batch(sample)
        shardings = layout.state_shardings(model.module, jax.eval_shape(built.init_state, params, frozen, rest))
        params, frozen, rest = (
            sharding_lib.place(t, shardings[k])
            for t, k in zip((params, frozen, rest), ("params", "frozen", "rest"), strict=True)
        )
    return built.init_state(params, frozen, rest, shardings)


def _inputs(batch: dict) -> dict:
    return {k: jnp.asarray(v) for k, v in model_inputs(batch).items()}


def _with_attributes(graphdef: Any, params: dict, frozen: dict, rest: dict, **attributes: Any) -> Any:
    """The same graph with ``attributes`` set on every module that has them (e.g. ``dtype``: the compute dtype;
    parameters keep their storage dtype)."""
    module = nnx.merge(graphdef, params, frozen, rest)
    module.set_attributes(**attributes, raise_if_not_found=False)
    return nnx.graphdef(module)
