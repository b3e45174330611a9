"""Schedules as schema types: the names `finetune.optim.make_schedule` builds, and the arguments each one takes.

`Schedule` is the type of a recipe's ``schedule`` and of a group's: a name, a dict ``{"name": ..., **arguments}``, a
constant learning rate, or an optax schedule. A name that is not a schedule, an argument the schedule does not take,
or one it needs and lacks (``piecewise`` without ``scales``, ``joined`` without ``schedules``) is a violation that
says what the schedule needs. `Steps` is a length in steps or as a fraction of training (``warmup``, boundaries).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any

import pydantic
from pydantic import ConfigDict, Field, ValidationError

from finetune.schema import Count, Finite, NonNegative, Positive
from finetune.violations import close_names, first_problem, violation

SCHEDULES = ("constant", "cosine", "linear", "exponential", "piecewise", "joined")


def _steps_or_fraction(value: Any) -> Any:
    if not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value) and value >= 0:
        if value < 1 or float(value).is_integer():
            return value
    raise violation(
        "a number of steps (an int >= 0) or a fraction of training in [0, 1)",
        "Write e.g. 100 (steps) or 0.06 (6% of training).",
    )


Steps = Annotated[Any, pydantic.AfterValidator(_steps_or_fraction)]


class _Args(pydantic.BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, arbitrary_types_allowed=True)
    name: str = "constant"
    warmup: Steps = 0


class _Decaying(_Args):
    end_factor: NonNegative = 0.0


class _Exponential(_Decaying):
    transition_steps: Count = 1
    decay_rate: Positive = 0.99


class _Piecewise(_Args):
    boundaries: list[Steps]
    scales: list[Finite]

    @pydantic.model_validator(mode="after")
    def _same_length(self):
        if len(self.boundaries) != len(self.scales):
            raise violation("a dict whose `boundaries` and `scales` have the same length")
        return self


class _Joined(_Args):
    schedules: list[Schedule] = Field(min_length=2)
    boundaries: list[Steps]

    @pydantic.model_validator(mode="after")
    def _one_fewer(self):
        if len(self.boundaries) != len(self.schedules) - 1:
            raise violation("a dict with one boundary fewer than it has `schedules`")
        return self


_SCHEDULE_ARGS: dict[str, tuple[type[pydantic.BaseModel], str]] = {
    "constant": (_Args, "{'name': 'constant'} (optionally `warmup`)"),
    "cosine": (_Decaying, "{'name': 'cosine'} (optionally `warmup` and `end_factor`, a number >= 0)"),
    "linear": (_Decaying, "{'name': 'linear'} (optionally `warmup` and `end_factor`, a number >= 0)"),
    "exponential": (
        _Exponential,
        "{'name': 'exponential'} with optional `transition_steps` (an int >= 1), `decay_rate` (> 0), `end_factor`",
    ),
    "piecewise": (
        _Piecewise,
        "{'name': 'piecewise', 'boundaries': [...], 'scales': [...]}: boundaries (steps, or fractions of "
        "training) and the LR factors from each boundary on, of the same length",
    ),
    "joined": (
        _Joined,
        "{'name': 'joined', 'schedules': [...], 'boundaries': [...]}: two or more schedules and the steps between "
        "them (one boundary fewer than schedules)",
    ),
}


def schedule_args(value: Any) -> dict[str, Any] | None:
    """``{"name": ..., **arguments}`` of a schedule given by name or dict (None for a number or an optax schedule).

    Raises a pydantic violation (reported by `error`) when the name is unknown or the arguments are not what that
    schedule takes.
    """
    if callable(value):
        return None
    if not isinstance(value, bool) and isinstance(value, int | float):
        if math.isfinite(value) and value > 0:
            return None
        raise violation("a constant learning rate > 0, a schedule name or dict, or an optax schedule")
    if not isinstance(value, str | Mapping):
        raise violation(
            f"a schedule name ({', '.join(SCHEDULES)}), a dict of schedule arguments, or an optax schedule",
            "Write e.g. 'cosine' or {'name': 'cosine', 'warmup': 0.06}.",
        )
    args = {"name": value} if isinstance(value, str) else dict(value)
    name = args.get("name", "constant")
    if name not in SCHEDULES:
        raise violation(f"one of {', '.join(SCHEDULES)}{close_names(name, SCHEDULES)}", "Pick one of these names.")
    model, needs = _SCHEDULE_ARGS[name]
    try:
        model.model_validate(args)
    except ValidationError as e:
        raise violation(f"{needs}", first_problem(e)) from None
    return args


def _schedule(value: Any) -> Any:
    schedule_args(value)
    return value


Schedule = Annotated[Any, pydantic.AfterValidator(_schedule)]
_Joined.model_rebuild()
