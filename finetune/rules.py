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
from typing import Any

import jax
import numpy as np

from finetune.errors import RulesError


@dataclasses.dataclass(frozen=True)
class Group:
    """How one group of parameters trains.

    Attributes:
      lr_mult: Multiplies the learning rate (and schedule) of the recipe; must be > 0.
      wd_mult: Multiplies the recipe's weight decay for the parameters the decay mask selects; >= 0, 0 = no decay.
      trainable: False freezes the group: no gradient is computed for it and it has no optimizer state.
      schedule: Optional schedule of its own (a name, a dict of schedule arguments, or an optax schedule); the
        group's learning rate is then ``schedule(step) * lr_mult``.
    """

    lr_mult: float = 1.0
    wd_mult: float = 1.0
    trainable: bool = True
    schedule: Any = None

    def __post_init__(self):
        if not isinstance(self.lr_mult, int | float) or not self.lr_mult > 0:
            raise RulesError(
                f"`lr_mult` must be a number > 0; received lr_mult={self.lr_mult!r}. To stop a group from training, "
                "use Group(trainable=False) instead of a zero multiplier."
            )
        if not isinstance(self.wd_mult, int | float) or not self.wd_mult >= 0:
            raise RulesError(
                f"`wd_mult` must be a number >= 0 (0 turns weight decay off); received wd_mult={self.wd_mult!r}."
            )


DEFAULT_GROUPS: dict[str, Group] = {"backbone": Group(), "head": Group(), "new": Group()}


@dataclasses.dataclass(frozen=True)
class LayerDecay:
    """A rule target that gives layer ``i`` of ``num_layers`` the LR multiplier ``decay ** (num_layers - i)``.

    Use it in place of a group name. The layer index is group 1 of the rule's regex, or ``layer`` when given (e.g.
    ``layer=-1`` for embeddings, which then get ``decay ** (num_layers + 1)``, as in BEiT / timm).

    Example:
      >>> rules = [(r"encoder/layers/(\\d+)/.*", LayerDecay(0.75, 6)),
      ...          (r"embeddings/.*", LayerDecay(0.75, 6, layer=-1))]
    """

    decay: float
    num_layers: int
    layer: int | None = None
    wd_mult: float = 1.0

    def __post_init__(self):
        if not 0 < self.decay <= 1:
            raise RulesError(f"`decay` of LayerDecay must be in (0, 1]; received decay={self.decay!r}. Typical: 0.75.")

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
        name = "embeddings" if index < 0 else f"layer_{index:02d}"
        return name, Group(lr_mult=self.decay ** (self.num_layers - index), wd_mult=self.wd_mult)


Rule = tuple[str, "str | LayerDecay"]


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


def _compile(rules: Sequence[Rule], groups: Mapping[str, Group]) -> list[tuple[re.Pattern, Any]]:
    compiled, unknown = [], []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, tuple | list) and len(rule) == 2 and isinstance(rule[0], str)):
            raise RulesError(
                f"Each rule must be a (regex, group) pair; received rules[{i}]={rule!r}. "
                "Write e.g. (r'.*', 'backbone')."
            )
        pattern, target = rule
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise RulesError(f"`rules[{i}]` has an invalid regex {pattern!r}: {e}. Fix the pattern.") from None
        if isinstance(target, str) and target not in groups:
            unknown.append(f"rules[{i}] = ({pattern!r}, {target!r})")
        elif not isinstance(target, str | LayerDecay):
            raise RulesError(
                f"The group of `rules[{i}]` must be a group name or a LayerDecay; received {target!r}. "
                f"Defined groups: {', '.join(sorted(groups))}."
            )
        compiled.append((regex, target))
    if unknown:
        raise RulesError(
            f"These rules name groups that are not defined: {'; '.join(unknown)}. Defined groups: "
            f"{', '.join(sorted(groups))}. Fix the name, or define the group with groups={{name: Group(...)}}."
        )
    return compiled


def assign(paths: Sequence[str], rules: Sequence[Rule], groups: Mapping[str, Group] | None = None) -> Assignment:
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
