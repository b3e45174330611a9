"""Pictures: the learning rate of every parameter group over training (`schedule_curves`, `plot_schedule`)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from finetune import optim
from finetune.recipe import Recipe


def schedule_curves(model: Any, recipe: Recipe, total_steps: int) -> dict[str, np.ndarray]:
    """``{group: LR at every optimizer step}`` over ``total_steps``, phases included (0 while a group is frozen).

    Phases share the steps in proportion to their epochs (the main phase counts ``recipe.epochs``).
    """
    from finetune.training.loop import _phase_recipe, plan

    phases = [(p["epochs"], _phase_recipe(recipe, p)) for p in recipe.phases] + [(recipe.epochs, recipe)]
    weights = np.array([e for e, _ in phases], float)
    lengths = np.floor(weights / weights.sum() * total_steps).astype(int)
    lengths[-1] = total_steps - lengths[:-1].sum()
    curves: dict[str, list[np.ndarray]] = {}
    for done, ((_, phase), n) in enumerate(zip(phases, lengths, strict=True)):
        assignment = plan(model, phase)
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
