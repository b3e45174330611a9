"""Parameter-group rules: first match wins, coverage both ways, clear errors, layer decay, decay mask."""

import numpy as np
import pytest

from finetune import Group, LayerDecay, RulesError
from finetune.params.rules import assign, decay_mask

PATHS = [
    "embeddings/kernel",
    "encoder/layers/0/kernel",
    "encoder/layers/1/kernel",
    "encoder/layers/1/bias",
    "pooler/kernel",
    "classifier/kernel",
    "classifier/bias",
]


def test_first_matching_rule_wins():
    rules = [(r"classifier/.*", "new"), (r".*/kernel", "head"), (r".*", "backbone")]
    a = assign(PATHS, rules)
    assert a.group_of["classifier/kernel"] == "new"  # also matches rule 1, but rule 0 comes first
    assert a.group_of["pooler/kernel"] == "head"
    assert a.group_of["encoder/layers/1/bias"] == "backbone"
    assert a.rule_of["classifier/bias"] == 0 and a.rule_of["encoder/layers/1/bias"] == 2


def test_fullmatch_not_search():
    # "kernel" alone would match every kernel with re.search; fullmatch requires the whole path.
    with pytest.raises(RulesError, match="matches no parameter"):
        assign(PATHS, [("kernel", "head"), (".*", "backbone")])


def test_uncovered_parameters_are_all_listed_with_a_catch_all_hint():
    with pytest.raises(RulesError) as e:
        assign(PATHS, [(r"encoder/.*", "backbone")])
    msg = str(e.value)
    for path in ["embeddings/kernel", "pooler/kernel", "classifier/kernel", "classifier/bias"]:
        assert path in msg
    assert "4 parameter(s)" in msg and "(r'.*', 'backbone')" in msg


def test_rule_matching_nothing_is_an_error_with_near_misses():
    with pytest.raises(RulesError) as e:
        assign(PATHS, [(r"clasifier/.*", "new"), (r".*", "backbone")])
    assert "rules[0]" in str(e.value) and "classifier/kernel" in str(e.value)


def test_unknown_group_lists_defined_groups():
    with pytest.raises(RulesError) as e:
        assign(PATHS, [(r"classifier/.*", "neww"), (r".*", "backbone")])
    assert "'neww'" in str(e.value) and "backbone, head, new" in str(e.value)


def test_all_problems_reported_in_one_error():
    with pytest.raises(RulesError) as e:
        assign(PATHS, [(r"typo/.*", "new"), (r"encoder/.*", "backbone")])
    assert "rules[0]" in str(e.value) and "covered by no rule" in str(e.value)


@pytest.mark.parametrize("kwargs", [{"lr_mult": 0}, {"lr_mult": -1.0}, {"wd_mult": -0.1}])
def test_bad_group_multipliers_are_refused(kwargs):
    with pytest.raises(RulesError, match=next(iter(kwargs))):
        Group(**kwargs)


def test_layer_decay_gives_layer_i_decay_to_the_power_L_minus_i():
    rules = [
        (r"encoder/layers/(\d+)/.*", LayerDecay(0.5, 2)),
        (r"embeddings/.*", LayerDecay(0.5, 2, layer=-1)),
        (r".*", "head"),
    ]
    a = assign(PATHS, rules)
    mult = {p: a.groups[a.group_of[p]].lr_mult for p in PATHS}
    assert mult["encoder/layers/0/kernel"] == 0.25
    assert mult["encoder/layers/1/kernel"] == 0.5
    assert mult["embeddings/kernel"] == 0.125
    assert mult["classifier/kernel"] == 1.0


def test_decay_mask_defaults_to_ndim_at_least_two_and_rules_override():
    flat = {"k": np.zeros((2, 3)), "b": np.zeros(3), "emb": np.zeros((5, 2)), "scale": np.zeros(4)}
    assert decay_mask(flat) == {"k": True, "b": False, "emb": True, "scale": False}
    assert decay_mask(flat, [("emb", False)]) == {"k": True, "b": False, "emb": False, "scale": False}


def test_the_plan_is_pure_and_adapters_are_a_step_of_their_own():
    import finetune as ft
    from finetune.params import lora, plan
    from tests.tiny import TinyClassifier

    model = ft.Model(TinyClassifier(), task="text-classification")
    recipe = ft.Recipe(lora={"targets": r"encoder/\d+", "rank": 2})
    before = plan.of_model(model, recipe)  # no adapters yet: nothing is added, nothing goes to `lora`
    assert not lora.adapted(model.module) and "lora" not in set(before.group_of.values())
    assert plan.assignment(before.group_of, None, rules=model.rules).group_of == before.group_of  # paths in, groups out
    model.plan(recipe)  # the facade adds the adapters (once), then plans
    assert sorted(lora.adapted(model.module)) == ["encoder/0", "encoder/1"]
    after = plan.of_model(model, recipe)
    assert after.group_of["encoder/0/lora/lora_a"] == "lora" and not after.trainable("encoder/0/kernel")
    assert model.add_adapters(recipe.lora) == ["encoder/0", "encoder/1"]  # the same config again changes nothing
