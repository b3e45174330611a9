"""Summary tables and plots: the parameter-group report printed by `Model.summary()` and at the start of `fit`,
and the learning rate of every group over training (`schedule_curves`, `plot_schedule`)."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from finetune import optim
from finetune.params.rules import decay_mask, flatten
from finetune.recipe import Recipe

# The optimizer's state has the same shapes whatever the training length; schedules only need one that no warmup or
# decay given in steps exceeds.
_ANY_LENGTH = 1 << 30


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]

    def line(row):
        return "  ".join(
            str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(row, widths, strict=True))
        )

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def group_report(model: Any, *, recipe: Any = None, trainer: Any = None, paths: bool = False) -> str:
    """Per group: parameters, bytes, learning rate, weight decay, trainable, and optimizer-state bytes.

    The optimizer-state bytes are the trainer's once it has built its state, else those of the optimizer the recipe
    builds, worked out from shapes alone (nothing is allocated).
    """
    recipe = recipe or Recipe()
    assignment = trainer.assignment if trainer is not None else model.plan(recipe)
    flat = flatten(nnx.to_pure_dict(nnx.state(model.module, nnx.Param)))
    if trainer is not None and trainer.state is not None and trainer.state.get("opt") is not None:
        opt_bytes = optim.state_bytes(trainer.state["opt"])
    else:
        opt_bytes = planned_state_bytes(model, recipe, assignment)
    rows, total = [], [0, 0, 0]
    for name, group in assignment.groups.items():
        members = assignment.paths_in(name)
        count = sum(int(np.prod(flat[p].shape)) for p in members)
        size = sum(int(np.prod(flat[p].shape)) * flat[p].dtype.itemsize for p in members)
        trainable = group.trainable
        lr = f"{recipe.learning_rate * group.lr_mult:.3g} (x{group.lr_mult:g})" if trainable else "-"
        wd = f"{recipe.weight_decay * group.wd_mult:.3g}" if trainable else "-"
        state = _bytes(opt_bytes.get(name, 0)) if opt_bytes else ""
        rows.append([name, f"{count:,}", _bytes(size), lr, wd, "yes" if trainable else "frozen", state])
        total[0] += count
        total[1] += size
        total[2] += opt_bytes.get(name, 0)
    rows.append(["total", f"{total[0]:,}", _bytes(total[1]), "", "", "", _bytes(total[2]) if opt_bytes else ""])
    header = ["group", "params", "bytes", "lr", "weight decay", "trainable", "optimizer state"]
    text = _table(header, rows)
    if paths:
        detail = [
            [p, assignment.group_of[p], f"rules[{assignment.rule_of[p]}]", str(tuple(flat[p].shape))] for p in flat
        ]
        text += "\n\n" + _table(["path", "group", "rule", "shape"], detail)
    return text


def planned_state_bytes(model: Any, recipe: Any, assignment: Any) -> dict[str, int]:
    """Optimizer-state bytes per trainable group of the optimizer ``fit`` would build under ``recipe``, from
    `jax.eval_shape` of its ``init`` (no array is allocated); empty when no group is trainable."""
    from finetune.training.step import split

    trainable = {p for p in assignment.group_of if assignment.trainable(p)}
    if not trainable:
        return {}
    params = split(model.module, trainable)[2]
    decay = decay_mask(flatten(params), recipe.decay_rules)
    tx, _ = optim.build(assignment, decay, recipe.optimizer_spec(), total_steps=_ANY_LENGTH)
    return optim.state_bytes(jax.eval_shape(tx.init, params))


def schedule_curves(model: Any, recipe: Recipe, total_steps: int) -> dict[str, np.ndarray]:
    """``{group: LR at every optimizer step}`` over ``total_steps``, phases included (0 while a group is frozen).

    Phases share the steps in proportion to their epochs (the main phase counts ``recipe.epochs``).
    """
    phases = recipe.stages(recipe.epochs)
    weights = np.array([e for e, _ in phases], float)
    lengths = np.floor(weights / weights.sum() * total_steps).astype(int)
    lengths[-1] = total_steps - lengths[:-1].sum()
    curves: dict[str, list[np.ndarray]] = {}
    for done, ((_, phase), n) in enumerate(zip(phases, lengths, strict=True)):
        assignment = model.plan(phase)
        _, schedules = optim.build(
            assignment, {p: False for p in assignment.group_of}, phase.optimizer_spec(), total_steps=max(int(n), 1)
        )
        steps = np.arange(int(n))
        for group in assignment.groups:
            values = np.asarray([float(schedules[group](s)) for s in steps]) if group in schedules else np.zeros(n)
            curves.setdefault(group, [np.zeros(sum(lengths[:done]))]).append(values)
        for group, parts in curves.items():
            if group not in assignment.groups:
                parts.append(np.zeros(n))
    return {g: np.concatenate(parts) for g, parts in curves.items()}


def plot_schedule(curves: dict[str, np.ndarray], path: str | os.PathLike, *, title: str = "learning rate per group"):
    """Saves the curves of `schedule_curves` as a PNG (log-scale LR against step). Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("Plotting needs matplotlib: pip install 'finetune[plot]'.") from e
    fig, ax = plt.subplots(figsize=(7, 4))
    for group, values in sorted(curves.items()):
        ax.plot(np.arange(len(values)), np.where(values > 0, values, np.nan), label=group)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100)
    plt.close(fig)
    return path
