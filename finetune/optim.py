"""Rules + recipe -> one optax transformation, and schedules by name.

The chain, over the trainable parameters only (frozen ones are not in the tree at all)::

    skip_nonfinite(                       # a non-finite gradient skips the step, and is counted
      MultiSteps(                         # gradient accumulation (k = 1: every step)
        chain(
          clip_by_global_norm(clip),      # over all trainable gradients together (a scalar factor, fused)
          partition({group: inject_hyperparams(base)(learning_rate=schedule * lr_mult,
                                                     weight_decay=wd * wd_mult, mask=decay mask)}))))
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Annotated, Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import pydantic

from finetune import schedules, schema, violations
from finetune.errors import ConfigError
from finetune.params.rules import Assignment, path_str

# Optimizers with decoupled weight decay built in (``weight_decay=`` and ``mask=``), and the others (decay added
# before the update, i.e. coupled, as torch's SGD/Adam ``weight_decay``).
_DECOUPLED = {"adamw": optax.adamw, "lion": optax.lion, "lamb": optax.lamb}
_PLAIN = {
    "adam": optax.adam,
    "sgd": optax.sgd,
    "rmsprop": optax.rmsprop,
    "adagrad": optax.adagrad,
    "adabelief": optax.adabelief,
    "nadam": optax.nadam,
}
OPTIMIZERS = tuple(sorted([*_DECOUPLED, *_PLAIN, "adafactor"]))
SCHEDULES = schedules.SCHEDULES
# The arguments of each named optimizer that finetune sets itself (so they are not `optimizer_options`).
_SET_BY_FINETUNE = {
    **{name: ("learning_rate", "weight_decay", "mask") for name in _DECOUPLED},
    **{name: ("learning_rate",) for name in _PLAIN},
    "adafactor": ("learning_rate", "weight_decay_rate", "weight_decay_mask"),
}


def option_names(optimizer: Any) -> tuple[str, ...] | None:
    """The `optimizer_options` a named optimizer takes (its optax factory's arguments that finetune does not set);
    ``()`` for a transformation without learning rate; None for a factory of the user's (its options are its own)."""
    if isinstance(optimizer, optax.GradientTransformation):
        return ()
    if not isinstance(optimizer, str) or optimizer not in OPTIMIZERS:
        return None
    factory = _DECOUPLED.get(optimizer) or _PLAIN.get(optimizer) or optax.adafactor
    return tuple(p for p in inspect.signature(factory).parameters if p not in _SET_BY_FINETUNE[optimizer])


def _steps(value: float | int | None, total: int | None, what: str) -> int:
    """A step count given in steps or as a fraction of training (checked as `finetune.schedules.Steps`)."""
    if value is None:
        return 0
    if isinstance(value, float) and 0 <= value < 1:
        if total is None:
            raise ConfigError(
                f"`{what}` is a fraction ({value}) of the training length, which is unknown here. Give it in steps, "
                "or pass `total_steps`."
            )
        return int(round(value * total))
    return int(value)


@schema.arguments
def make_schedule(
    spec: schedules.Schedule = "constant",
    *,
    learning_rate: schema.Positive,
    total_steps: schema.Index | None = None,
    warmup: schedules.Steps = 0,
) -> optax.Schedule:
    """Builds a learning-rate schedule peaking at ``learning_rate``.

    Args:
      spec: A name (``constant``, ``cosine``, ``linear``, ``exponential``, ``piecewise``, ``joined``), a dict
        ``{"name": ..., **arguments}``, a number (constant), or any optax schedule (used as is). Arguments:
        ``warmup`` (steps, or a fraction of ``total_steps``); ``end_factor`` (final LR / peak, default 0 for cosine
        and linear); ``decay_rate`` and ``transition_steps`` (exponential); ``boundaries`` (steps or fractions) and
        ``scales`` (piecewise, multiplying the LR at each boundary); ``schedules`` and ``boundaries`` (joined).
      learning_rate: The peak learning rate.
      total_steps: Training length in optimizer steps; needed by fractions and by decaying schedules.
      warmup: Linear warmup from 0, in steps or as a fraction of ``total_steps``.

    Returns:
      An optax schedule ``step -> learning rate``.

    Example:
      >>> sched = make_schedule("cosine", learning_rate=1e-3, total_steps=1000, warmup=0.06)
      >>> round(float(sched(60)), 6)
      0.001
    """
    if callable(spec):
        return spec
    if isinstance(spec, int | float) and not isinstance(spec, bool):
        return optax.constant_schedule(float(spec))
    args = dict(spec) if isinstance(spec, Mapping) else {"name": spec}
    name = args.pop("name", "constant")
    warmup_steps = _steps(args.pop("warmup", warmup), total_steps, "warmup")
    if total_steps is not None and warmup_steps > total_steps:
        raise ConfigError(
            f"`warmup` is {warmup_steps} steps, longer than training ({total_steps} steps). Shorten the warmup (e.g. "
            "warmup=0.06 for 6% of training) or train longer."
        )
    decay = (total_steps or 0) - warmup_steps
    end = learning_rate * args.pop("end_factor", 0.0)
    if name in ("cosine", "linear") and total_steps is None:
        raise ConfigError(f"The {name!r} schedule decays over training, so `total_steps` must be known.")
    if name == "constant":
        main = optax.constant_schedule(learning_rate)
    elif name == "cosine":
        main = optax.cosine_decay_schedule(learning_rate, max(decay, 1), alpha=end / learning_rate)
    elif name == "linear":
        main = optax.linear_schedule(learning_rate, end, max(decay, 1))
    elif name == "exponential":
        main = optax.exponential_decay(
            learning_rate, args.pop("transition_steps", 1), args.pop("decay_rate", 0.99), end_value=end or None
        )
    elif name == "piecewise":
        bounds = [_steps(b, total_steps, "boundaries") for b in args.pop("boundaries", ())]
        main = optax.piecewise_constant_schedule(learning_rate, dict(zip(bounds, args.pop("scales", ()), strict=True)))
    else:
        parts = [make_schedule(s, learning_rate=learning_rate, total_steps=total_steps) for s in args.pop("schedules")]
        bounds = [_steps(b, total_steps, "boundaries") for b in args.pop("boundaries")]
        main = optax.join_schedules(parts, bounds)
    if warmup_steps == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), main], [warmup_steps])


def _base_factory(optimizer: Any, options: Mapping[str, Any]) -> Callable[..., optax.GradientTransformation]:
    """``(learning_rate, weight_decay, mask) -> GradientTransformation`` for a named or user-given optimizer."""
    if isinstance(optimizer, optax.GradientTransformation):
        # A transformation without a learning rate (e.g. optax.scale_by_adam()): finetune adds decoupled decay and
        # the (scheduled, per-group) learning rate, the way optax.adamw is built.
        return lambda learning_rate, weight_decay, mask: optax.chain(
            optimizer, optax.add_decayed_weights(weight_decay, mask), optax.scale_by_learning_rate(learning_rate)
        )
    if callable(optimizer):
        return lambda learning_rate, weight_decay, mask: optax.chain(
            optax.add_decayed_weights(weight_decay, mask), optimizer(learning_rate, **options)
        )
    if optimizer in _DECOUPLED:
        return lambda learning_rate, weight_decay, mask: _DECOUPLED[optimizer](
            learning_rate, weight_decay=weight_decay, mask=mask, **options
        )
    if optimizer == "adafactor":
        return lambda learning_rate, weight_decay, mask: optax.adafactor(
            learning_rate, weight_decay_rate=weight_decay, weight_decay_mask=mask, **options
        )
    if optimizer in _PLAIN:
        return lambda learning_rate, weight_decay, mask: optax.chain(
            optax.add_decayed_weights(weight_decay, mask), _PLAIN[optimizer](learning_rate, **options)
        )
    raise AssertionError(optimizer)  # OptimizerSpec's schema admits only the cases above


def _labeller(mapping: Mapping[str, Any]) -> Callable[[Any], Any]:
    """A callable that labels whatever tree it is given by path (the form optax.partition handles for NNX states)."""
    return lambda tree: jax.tree_util.tree_map_with_path(lambda kp, _: mapping[path_str(kp)], tree)


def _optimizer(value: Any) -> Any:
    if isinstance(value, optax.GradientTransformation) or callable(value) or value in OPTIMIZERS:
        return value
    raise schema.violation(
        f"one of {', '.join(OPTIMIZERS)}{violations.close_names(value, OPTIMIZERS)}, an optax optimizer factory "
        "(learning_rate, **options) -> GradientTransformation, or a transformation without learning rate",
        "Pick one of these names.",
    )


# A named optimizer, an optax factory ``(learning_rate, **options)``, or a transformation without learning rate.
Optimizer = Annotated[Any, pydantic.AfterValidator(_optimizer)]


@schema.checked(what="the optimizer spec")
class OptimizerSpec:
    """Everything `build` needs besides the rules (the same types as the `finetune.Recipe` fields it comes from)."""

    optimizer: Optimizer = "adamw"
    learning_rate: schema.Positive = 1e-3
    schedule: schedules.Schedule = "constant"
    warmup: schedules.Steps = 0
    weight_decay: schema.NonNegative = 0.0
    clip_norm: schema.Positive | None = None
    accumulate: schema.Count = 1
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


def build(
    assignment: Assignment, decay: Mapping[str, bool], spec: OptimizerSpec, *, total_steps: int | None
) -> tuple[SkipNonfinite, dict[str, optax.Schedule]]:
    """The optimizer over the trainable parameters, and the LR schedule of every trainable group.

    Args:
      assignment: The group of every parameter (`finetune.params.rules.assign`).
      decay: ``{path: bool}``, the weight-decay mask (`finetune.params.rules.decay_mask`).
      spec: Optimizer, peak learning rate, schedule, weight decay, clipping, accumulation.
      total_steps: Optimizer steps in training (for fractions and decays); None when unknown.

    Returns:
      ``(transformation, {group: schedule})``; the transformation expects the pure dict of trainable parameters, and
      the train step applies it with `apply_step`.
    """
    factory = _base_factory(spec.optimizer, spec.options)
    mask = _labeller(decay)
    inject = optax.inject_hyperparams(lambda learning_rate, weight_decay: factory(learning_rate, weight_decay, mask))
    transforms, schedules = {}, {}
    for name, group in assignment.groups.items():
        if not group.trainable:
            continue
        base = make_schedule(
            group.schedule if group.schedule is not None else spec.schedule,
            learning_rate=spec.learning_rate,
            total_steps=total_steps,
            warmup=spec.warmup,
        )
        schedules[name] = _scaled(base, group.lr_mult)
        transforms[name] = inject(learning_rate=schedules[name], weight_decay=spec.weight_decay * group.wd_mult)
    trainable = {p: g for p, g in assignment.group_of.items() if assignment.groups[g].trainable}
    chain = [optax.partition(transforms, _labeller(trainable))]
    if spec.clip_norm is not None:
        chain.insert(0, clip_by_global_norm(spec.clip_norm))
    tx = optax.chain(*chain)
    if spec.accumulate > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=spec.accumulate).gradient_transformation()
    return skip_nonfinite(tx), schedules


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm`, written as one multiplication by ``min(1, max_norm / norm)``.

    The same state (`optax.EmptyState`) and the same result: gradients under the limit are left exactly as they are,
    others are scaled to norm ``max_norm`` (within a rounding). optax picks per element between ``g`` and
    ``g / norm * max_norm``, and XLA:CPU then writes the clipped gradients out before the optimizer reads them; a
    scalar factor fuses into the optimizer's own loops (docs/performance.md, "finetune/optim.py").

    Example:
      >>> updates, _ = clip_by_global_norm(1.0).update({"w": jnp.array([3.0, 4.0])}, optax.EmptyState())
      >>> updates["w"].tolist()
      [0.6000000238418579, 0.800000011920929]
    """

    def update(updates, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / optax.tree.norm(updates))  # a zero norm gives inf, hence 1
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class SkipNonfinite(NamedTuple):
    """`skip_nonfinite`'s transformation: optax's ``init`` / ``update`` pair, plus the wrapped ``inner`` one."""

    init: Callable[..., Any]
    update: Callable[..., Any]
    inner: optax.GradientTransformationExtraArgs


def skip_nonfinite(inner: optax.GradientTransformation) -> SkipNonfinite:
    """``inner``, except that a gradient holding a NaN or an Inf changes nothing: parameters and state are kept.

    The state is optax's `optax.ApplyIfFiniteState` (consecutive and total skipped steps), and ``update`` is
    `optax.apply_if_finite`'s with no limit on consecutive skips (finetune stops training itself, see the trainer).
    The train step does not call ``update`` but `apply_step`, which puts the whole step (update and parameters) under
    one ``lax.cond``: the optimizer state is donated to the step, and choosing between new and old state after the
    update costs a copy of every moment (measured below).

    Example:
      >>> tx = skip_nonfinite(optax.sgd(0.1))
      >>> params = {"w": jnp.ones(2)}
      >>> state = tx.init(params)
      >>> params, state = apply_step(tx, {"w": jnp.array([1.0, jnp.nan])}, state, params)
      >>> params["w"].tolist(), int(state.total_notfinite)
      ([1.0, 1.0], 1)
    """
    inner = optax.with_extra_args_support(inner)
    wrapped = optax.apply_if_finite(inner, max_consecutive_errors=2**30)
    return SkipNonfinite(wrapped.init, wrapped.update, inner)


def apply_step(tx: Any, grads: Any, opt_state: Any, params: Any) -> tuple[Any, Any]:
    """``(params, opt_state)`` after one step of ``tx`` on ``grads``.

    For a `skip_nonfinite` transformation the update and its application run under one ``lax.cond`` on the gradient
    being finite, whose other branch returns the parameters and state as they are. With the state donated, XLA then
    updates every buffer in place. optax's ``apply_if_finite`` (a ``cond`` inside the update, then the parameters
    updated outside it) or a select between the new and the old state cost copies of the moments instead
    (docs/performance.md, "finetune/optim.py").
    """
    if not isinstance(tx, SkipNonfinite):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state
    # A NaN or an Inf anywhere makes the norm non-finite (so does a norm beyond float32's range, ~1.8e19, a step no
    # one wants either). One reduction, shared with clip_by_global_norm's, instead of an isfinite pass per leaf.
    finite = jnp.isfinite(optax.tree.norm(grads))

    def step(_):
        updates, inner_state = tx.inner.update(grads, opt_state.inner_state, params)
        return optax.apply_updates(params, updates), inner_state

    params, inner_state = jax.lax.cond(finite, step, lambda _: (params, opt_state.inner_state), None)
    skipped = jnp.logical_not(finite).astype(jnp.int32)
    return params, optax.ApplyIfFiniteState(
        notfinite_count=(opt_state.notfinite_count + 1) * skipped,
        last_finite=finite,
        total_notfinite=opt_state.total_notfinite + skipped,
        inner_state=inner_state,
    )


def _scaled(schedule: optax.Schedule, mult: float) -> optax.Schedule:
    return schedule if mult == 1.0 else (lambda step: schedule(step) * mult)


def nonfinite_counts(opt_state: Any) -> tuple[jax.Array, jax.Array]:
    """``(consecutive, total)`` non-finite steps skipped so far, from the optimizer state."""
    return opt_state.notfinite_count, opt_state.total_notfinite


def current_lrs(opt_state: Any) -> dict[str, jax.Array]:
    """``{group: learning rate}`` of the last applied step, read from the inject_hyperparams states."""
    out = {}
    for path, value in optax.tree_utils.tree_get_all_with_path(opt_state, "learning_rate"):
        if not hasattr(value, "dtype"):  # the schedule's own state, not the value
            continue
        group = next(
            (k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey) and k.key != "learning_rate"), None
        )
        out[str(group)] = value
    return out


def state_bytes(opt_state: Any) -> dict[str, int]:
    """Optimizer-state bytes per group (from the partition's per-group states)."""
    out = {}
    for path, value in optax.tree_utils.tree_get_all_with_path(opt_state, "inner_states"):
        del path
        for group, state in value.items():
            out[group] = sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))
    return out
