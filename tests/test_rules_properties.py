"""Property-based tests of the rules engine: for random parameter trees and rule lists, every trainable parameter
lands in exactly one group (the first rule that fully matches), and each group's update scales exactly with its LR
multiplier."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune import Group, RulesError
from finetune.optim import OptimizerSpec, build
from finetune.params.rules import assign, decay_mask, flatten

NAMES = st.sampled_from(["encoder", "decoder", "layers", "attn", "mlp", "head", "norm", "embed"])
LEAVES = st.sampled_from(["kernel", "bias", "scale", "embedding"])


@st.composite
def param_trees(draw):
    """Random nested dicts of small arrays, 1-3 levels deep, with unique paths."""
    paths = draw(st.lists(st.tuples(st.lists(NAMES, min_size=0, max_size=2), LEAVES), min_size=1, max_size=8))
    tree = {}
    for prefix, leaf in paths:
        node = tree
        for part in prefix:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            if leaf not in node:
                node[leaf] = jnp.ones((2, 3) if leaf in ("kernel", "embedding") else (3,))
    return tree


@st.composite
def rule_lists(draw, paths):
    """Rules made of pieces of real paths (some matching, some not), always ending with a catch-all."""
    groups = ["g0", "g1", "g2"]
    rules = []
    for _ in range(draw(st.integers(0, 4))):
        path = draw(st.sampled_from(paths))
        parts = path.split("/")
        cut = draw(st.integers(0, len(parts) - 1))
        pattern = "/".join(parts[:cut] + [".*"]) if cut else ".*/" + parts[-1] if len(parts) > 1 else parts[-1]
        rules.append((pattern, draw(st.sampled_from(groups))))
    return [*rules, (".*", draw(st.sampled_from(groups)))]


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_parameter_lands_in_exactly_the_first_matching_rules_group(data):
    tree = data.draw(param_trees())
    paths = list(flatten(tree))
    rules = data.draw(rule_lists(paths))
    mults = {g: data.draw(st.floats(0.01, 100)) for g in ("g0", "g1", "g2")}
    groups = {g: Group(lr_mult=m) for g, m in mults.items()}
    try:
        assignment = assign(paths, rules, groups)
    except RulesError as e:
        # Only legal reason: a non-final rule matched no path (shadowed or absent); the error names it.
        dead = [
            i
            for i, (p, _) in enumerate(rules)
            if not any(re.fullmatch(p, x) and all(not re.fullmatch(q, x) for q, _ in rules[:i]) for x in paths)
        ]
        assert dead and all(f"rules[{i}]" in str(e) for i in dead)
        return
    assert set(assignment.group_of) == set(paths)
    for path in paths:
        first = next(i for i, (p, _) in enumerate(rules) if re.fullmatch(p, path))
        assert assignment.rule_of[path] == first and assignment.group_of[path] == rules[first][1]

    tx, _ = build(
        assignment, decay_mask(flatten(tree)), OptimizerSpec(optimizer="sgd", learning_rate=0.5), total_steps=None
    )
    grads = jax.tree.map(jnp.ones_like, tree)
    updates = flatten(tx.update(grads, tx.init(tree), tree)[0])
    for path, update in updates.items():
        expected = -0.5 * groups[assignment.group_of[path]].lr_mult
        np.testing.assert_allclose(np.asarray(update), expected, rtol=1e-6)
