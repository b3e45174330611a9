"""Parameter paths, ordered ``(regex, group)`` rules, and the groups they build.

A parameter's path is its NNX path joined by "/" (``encoder/layers/3/attention/query/kernel``). Rules are an ordered
list of ``(regex, group)``: ``re.fullmatch`` on the path, first match wins. A group carries an LR multiplier, a
weight-decay multiplier, whether it trains, and optionally its own schedule.

Example:
  >>> rules = [(r".*classifier/.*", "new"), (r".*", "backbone")]
  >>> groups = {"backbone": Group(lr_mult=0.1), "new": Group(lr_mult=10.0)}
  >>> assignment = assign(["encoder/kernel", "classifier/kernel"], rules, groups)
  >>> assignment.group_of["classifier/kernel"]
  'new'
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Annotated, Any

import jax
import numpy as np
import pydantic
from pydantic import Field, Strict

from finetune import schedules, schema
from finetune.errors import RulesError

# A group's LR multiplier: zero would train nothing while keeping optimizer state, so it is refused with the fix.
LrMult = Annotated[
    float,
    Strict(),
    Field(gt=0, allow_inf_nan=False),
    schema.allowed(
        "a finite number > 0",
        "To stop a group from training, use Group(trainable=False) instead of a zero multiplier.",
    ),
]


@schema.checked(error=RulesError, what="Group")
class Group:
    """How one group of parameters trains.

    Attributes:
      lr_mult: Multiplies the learning rate (and schedule) of the recipe; must be > 0.
      wd_mult: Multiplies the recipe's weight decay for the parameters the decay mask selects; >= 0, 0 = no decay.
      trainable: False freezes the group: no gradient is computed for it and it has no optimizer state.
      schedule: Optional schedule of its own (a name, a dict of schedule arguments, or an optax schedule); the
        group's learning rate is then ``schedule(step) * lr_mult``.
    """

    lr_mult: LrMult = 1.0
    wd_mult: schema.NonNegative = 1.0
    trainable: schema.Flag = True
    schedule: schedules.Schedule | None = None


DEFAULT_GROUPS: dict[str, Group] = {"backbone": Group(), "head": Group(), "new": Group()}


@schema.checked(error=RulesError, what="LayerDecay")
class LayerDecay:
    """A rule target that gives layer ``i`` of ``num_layers`` the LR multiplier ``decay ** (num_layers - i)``.

    Use it in place of a group name. The layer index is group 1 of the rule's regex, or ``layer`` when given (e.g.
    ``layer=-1`` for embeddings, which then get ``decay ** (num_layers + 1)``, as in BEiT / timm). A rule whose
    regex captures a layer index >= ``num_layers`` is an error (that layer would get a multiplier above 1).

    Example:
      >>> rules = [(r"encoder/layers/(\\d+)/.*", LayerDecay(0.75, 6)),
      ...          (r"embeddings/.*", LayerDecay(0.75, 6, layer=-1))]
    """

    decay: schema.Unit
    num_layers: schema.Count
    layer: schema.Integer | None = None
    wd_mult: schema.NonNegative = 1.0

    def resolve(self, match: re.Match) -> tuple[str, Group]:
        if self.layer is not None:
            index = self.layer
        elif match.re.groups >= 1 and match.group(1) is not None:
            index = int(match.group(1))
        else:
            raise RulesError(
                f"A LayerDecay rule needs its regex to capture the layer index as group 1, or an explicit `layer`; "
                f"received regex {match.re.pattern!r}. Write e.g. r'encoder/layers/(\\d+)/.*'."
            )
        if index >= self.num_layers:
            raise RulesError(
                f"`num_layers` of LayerDecay must exceed every layer index its rule matches; received "
                f"num_layers={self.num_layers}, and the regex {match.re.pattern!r} matches layer {index} (at "
                f"{match.string!r}), which would get lr_mult {self.decay ** (self.num_layers - index):.3g}. Set "
                f"num_layers to the model's layer count (at least {index + 1})."
            )
        name = "embeddings" if index < 0 else f"layer_{index:02d}"
        return name, Group(lr_mult=self.decay ** (self.num_layers - index), wd_mult=self.wd_mult)


# One rule: a full-match regex over parameter paths and its group (a name, or a LayerDecay).
def _target(value: Any) -> Any:
    if isinstance(value, str | LayerDecay):
        return value
    raise schema.violation("a group name or a finetune.LayerDecay", "Write e.g. (r'.*', 'backbone').")


Rule = Annotated[
    tuple[schema.Regex, Annotated[Any, pydantic.AfterValidator(_target)]],
    schema.allowed(
        "a (regex, group) pair, the group a group name or a finetune.LayerDecay", "Write e.g. (r'.*', 'backbone')."
    ),
]
Rules = Annotated[
    tuple[Rule, ...], schema.allowed("a list of (regex, group) pairs", "Write e.g. [(r'.*', 'backbone')].")
]
# Weight-decay rules: (regex, bool) pairs, first full match wins.
DecayRule = Annotated[
    tuple[schema.Regex, schema.Flag],
    schema.allowed("a (regex, bool) pair", "Write e.g. (r'.*/bias', False)."),
]

_DecayRuleList = Annotated[
    tuple[DecayRule, ...],
    schema.allowed("None, a list of (regex, bool) pairs, or a callable (path, array) -> bool"),
]


def _decay_rules(value: Any) -> Any:
    if value is None or callable(value):
        return value
    return schema.validate_as(_DecayRuleList, value)


# `decay_rules`: None (ndim >= 2 decays), (regex, bool) rules, or a callable (path, array) -> bool.
DecayRules = Annotated[Any, pydantic.AfterValidator(_decay_rules)]


def path_str(keys: Iterable[Any]) -> str:
    """Joins a JAX / NNX key path into the "/"-separated string rules match against."""
    parts = []
    for k in keys:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                k = getattr(k, attr)
                break
        parts.append(str(k))
    return "/".join(parts)


def flatten(tree: Any) -> dict[str, Any]:
    """``{path: leaf}`` for a pure nested dict of parameters (the order of the tree)."""
    return {path_str(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@dataclasses.dataclass(frozen=True)
class Assignment:
    """The outcome of applying rules: the group of every path, the rule that caught it, and the groups used."""

    group_of: dict[str, str]
    rule_of: dict[str, int]
    groups: dict[str, Group]

    def paths_in(self, group: str) -> list[str]:
        return [p for p, g in self.group_of.items() if g == group]

    def trainable(self, path: str) -> bool:
        return self.groups[self.group_of[path]].trainable


def _near_misses(pattern: str, paths: Sequence[str], n: int = 5) -> list[str]:
    """Paths that a misspelt rule was probably meant to match: partial regex matches, then close strings."""
    try:
        partial = [p for p in paths if re.search(pattern, p)]
    except re.error:
        partial = []
    if partial:
        return partial[:n]
    return difflib.get_close_matches(pattern, list(paths), n=n, cutoff=0.3)


def _compile(rules: Sequence[Any], groups: Mapping[str, Group]) -> list[tuple[re.Pattern, Any]]:
    rules = schema.check(Rules, rules, name="rules", error=RulesError)
    unknown = [
        f"rules[{i}] = ({p!r}, {t!r})" for i, (p, t) in enumerate(rules) if isinstance(t, str) and t not in groups
    ]
    if unknown:
        raise RulesError(
            f"These rules name groups that are not defined: {'; '.join(unknown)}. Defined groups: "
            f"{', '.join(sorted(groups))}. Fix the name, or define the group with groups={{name: Group(...)}}."
        )
    return [(re.compile(pattern), target) for pattern, target in rules]


def assign(paths: Sequence[str], rules: Sequence[Any], groups: Mapping[str, Group] | None = None) -> Assignment:
    """Assigns every path to a group: first rule whose regex fully matches wins.

    Args:
      paths: Parameter paths.
      rules: Ordered ``(regex, group)`` pairs; ``group`` is a name in ``groups`` or a `LayerDecay`.
      groups: Group definitions; defaults to `DEFAULT_GROUPS` (``backbone``, ``head``, ``new``).

    Returns:
      An `Assignment`.

    Raises:
      RulesError: one error listing every problem of a kind: groups not defined, rules that match no path (with
        near misses), and paths no rule covers (with a catch-all suggestion).
    """
    groups = dict(DEFAULT_GROUPS if groups is None else groups)
    compiled = _compile(rules, groups)
    group_of, rule_of, used = {}, {}, set()
    for path in paths:
        for i, (regex, target) in enumerate(compiled):
            match = regex.fullmatch(path)
            if match is None:
                continue
            if isinstance(target, LayerDecay):
                name, group = target.resolve(match)
                groups.setdefault(name, group)
                target = name
            group_of[path], rule_of[path] = target, i
            used.add(i)
            break
    problems = []
    dead = [i for i in range(len(compiled)) if i not in used]
    for i in dead:
        near = _near_misses(rules[i][0], paths)
        hint = f" Near misses: {', '.join(near)}." if near else ""
        problems.append(f"rules[{i}] regex {rules[i][0]!r} matches no parameter (a typo?).{hint}")
    uncovered = [p for p in paths if p not in group_of]
    if uncovered:
        shown = ", ".join(uncovered[:20]) + (f" and {len(uncovered) - 20} more" if len(uncovered) > 20 else "")
        problems.append(
            f"{len(uncovered)} parameter(s) are covered by no rule: {shown}. Add a catch-all rule at the end, "
            "e.g. (r'.*', 'backbone')."
        )
    if problems:
        raise RulesError("The parameter-group rules do not fit this model:\n- " + "\n- ".join(problems))
    return Assignment(
        group_of=group_of, rule_of=rule_of, groups={g: groups[g] for g in dict.fromkeys(group_of.values())}
    )


def decay_mask(flat: Mapping[str, Any], rules: Sequence[tuple[str, bool]] | Callable | None = None) -> dict[str, bool]:
    """Which parameters weight decay applies to: ``ndim >= 2`` (kernels, embeddings), never biases or norm scales.

    ``rules`` overrides it: an ordered list of ``(regex, bool)`` (first full match wins, unmatched paths keep the
    default), or a callable ``(path, array) -> bool``.
    """
    mask = {}
    for path, leaf in flat.items():
        value = len(np.shape(leaf) if not hasattr(leaf, "shape") else leaf.shape) >= 2
        if callable(rules):
            value = bool(rules(path, leaf))
        elif rules:
            for pattern, flag in rules:
                if re.fullmatch(pattern, path):
                    value = bool(flag)
                    break
        mask[path] = value
    return mask
