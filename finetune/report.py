"""The parameter-group report printed by `Model.summary()` and at the start of `fit`."""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from finetune import optim
from finetune.rules import flatten


def _bytes(n: int) -> str:
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
    """Per group: parameters, bytes, learning rate, weight decay, trainable, and optimizer-state bytes once built."""
    from finetune.recipe import Recipe
    from finetune.training.trainer import plan

    recipe = recipe or Recipe()
    assignment = trainer.assignment if trainer is not None else plan(model, recipe)
    flat = flatten(nnx.to_pure_dict(nnx.state(model.module, nnx.Param)))
    opt_bytes = {}
    if trainer is not None and trainer.state is not None and trainer.state.get("opt") is not None:
        opt_bytes = optim.state_bytes(trainer.state["opt"])
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
