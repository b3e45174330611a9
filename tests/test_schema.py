"""The argument schema: every recipe field, nested ones too, refuses wrong-typed and out-of-range values with a
`ConfigError` naming the field, identically through `Model.compile` and the command line's ``--set``.

The fields come from the schema itself (`Recipe`, `Group` and `LoRAConfig`'s declared types), so a field added with
one of the schema's types is covered without touching this file; a field of a type of its own must get a strategy
in `OWN_TYPES` (`test_every_recipe_field_has_a_strategy_of_bad_values` fails until it has one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import types
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import finetune as ft
from finetune import cli, schedules, schema
from finetune.metrics import METRICS
from finetune.optim import OPTIMIZERS, SCHEDULES, make_schedule
from finetune.params.lora import LoRAConfig, Targets
from finetune.params.rules import Group, LrMult
from finetune.recipe import Recipe
from tests.tiny import TinyClassifier

EXAMPLES = 500
NAN, INF = float("nan"), float("inf")

# Values no field takes: a dict with an unknown key, and a list nested too deep.
JUNK = st.one_of(st.just({"zz_unknown": 1}), st.just([[["x"]]]))
NOT_A_NUMBER = st.one_of(st.booleans(), st.text(max_size=4), st.lists(st.integers(), max_size=2), JUNK)
NOT_AN_INT = st.one_of(st.floats(allow_nan=True, allow_infinity=True), NOT_A_NUMBER)
NOT_FINITE = st.sampled_from([NAN, INF, -INF])
WORDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_-", min_size=1, max_size=8)

# Bad values of each type of the schema.
BAD = {
    schema.Flag: st.one_of(
        st.integers(), st.floats(), st.sampled_from(["no", "yes", "true", "False", "0", ""]), st.lists(st.booleans())
    ),
    schema.Text: st.one_of(st.integers(), st.floats(), st.booleans(), st.lists(st.text(max_size=2), max_size=2), JUNK),
    schema.Count: st.one_of(st.integers(max_value=0), NOT_AN_INT),
    schema.Index: st.one_of(st.integers(max_value=-1), NOT_AN_INT),
    schema.Positive: st.one_of(st.floats(max_value=0.0), st.integers(max_value=0), NOT_FINITE, NOT_A_NUMBER),
    schema.NonNegative: st.one_of(st.floats(max_value=-1e-9), st.integers(max_value=-1), NOT_FINITE, NOT_A_NUMBER),
    schema.Unit: st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0001), NOT_FINITE, NOT_A_NUMBER),
    schema.Fraction: st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0), NOT_FINITE, NOT_A_NUMBER),
    schedules.Steps: st.one_of(
        st.integers(max_value=-1),
        st.floats(min_value=1.01, max_value=1e6).filter(lambda x: not x.is_integer()),
        NOT_FINITE,
        NOT_A_NUMBER,
    ),
}

BAD[LrMult] = BAD[schema.Positive]
BAD[Targets] = st.one_of(st.integers(), st.just([]), st.just(["("]), st.just([3]), JUNK)

BAD_SCHEDULE = st.one_of(
    WORDS.filter(lambda w: w not in SCHEDULES),
    st.floats(max_value=0.0),
    NOT_FINITE,
    st.booleans(),
    st.just({"name": "cosine", "zz_unknown": 1}),
    st.just({"name": "piecewise", "boundaries": [1], "scales": []}),
    st.builds(lambda v: {"name": "exponential", "decay_rate": v}, BAD[schema.Positive]),
    st.builds(lambda v: {"name": "linear", "warmup": v}, BAD[schedules.Steps]),
)


def _own_types(depth: int) -> dict[str, st.SearchStrategy]:
    """Bad values of the recipe fields whose type is their own (nested fields drawn from the schema again)."""
    return {
        "optimizer": st.one_of(WORDS.filter(lambda w: w not in OPTIMIZERS), st.integers(), st.floats(), JUNK),
        "schedule": BAD_SCHEDULE,
        "rules": st.one_of(
            st.integers(), WORDS, st.just([["encoder/(", "backbone"]]), st.just([[".*", 3]]), st.just(["x"]), JUNK
        ),
        "groups": st.one_of(st.integers(), WORDS, st.just({"backbone": 3}), _nested(Group, "backbone", depth)),
        "decay_rules": st.one_of(st.integers(), WORDS, st.just([["(", True]]), st.just([[".*", "no"]]), JUNK),
        "optimizer_options": st.one_of(st.integers(), WORDS, st.just({"zz_unknown": 1}), st.just([1])),
        "loss": st.one_of(st.integers(), WORDS, JUNK),
        "metrics": st.one_of(st.integers(), WORDS.filter(lambda w: w not in METRICS), st.just([1]), JUNK),
        "columns": st.one_of(st.integers(), WORDS, st.just({"zz": "a"}), st.just({"text": 3}), st.just([["text"]])),
        "packing": st.one_of(st.integers(), st.floats(), st.sampled_from(["no", "yes", "true", ""]), JUNK),
        "precision": st.one_of(WORDS.filter(lambda w: w not in ("float32", "bfloat16")), st.integers(), JUNK),
        "steps_per_execution": st.one_of(
            st.integers(max_value=0), st.floats(), WORDS.filter(lambda w: w != "auto"), st.booleans(), JUNK
        ),
        "phases": st.one_of(st.integers(), WORDS, st.just([{"epochs": 0}]), st.just([{"learning_rate": 1.0}]))
        if depth
        else st.one_of(st.integers(), WORDS, st.just([{"epochs": 0}]), _phase()),
        "lora": st.one_of(st.integers(), WORDS, st.just({"targets": "("}), _nested(LoRAConfig, None, depth)),
    }


def _phase() -> st.SearchStrategy:
    """A phase (epochs=1) with one bad recipe field."""
    return st.deferred(
        lambda: _bad_field(Recipe, depth=1, skip=("phases", "name", "description", "provenance")).map(
            lambda kv: [{"epochs": 1, kv[0]: kv[1]}]
        )
    )


def _nested(cls: type, key: str | None, depth: int) -> st.SearchStrategy:
    """A dict of ``cls``'s fields with one bad value (under ``key`` when given: a group's name)."""

    def build(kv):
        value = {"targets": ".*", **dict([kv])} if cls is LoRAConfig else dict([kv])
        return {key: value} if key else value

    return _bad_field(cls, depth=depth + 1, skip=("targets",) if cls is LoRAConfig else ()).map(build)


def _plain(hint: typing.Any) -> typing.Any:
    """The schema type of a field, without ``| None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _strategies(cls: type, depth: int) -> dict[str, st.SearchStrategy]:
    hints = typing.get_type_hints(cls, include_extras=True)
    own = _own_types(depth) if cls is Recipe else {}
    out = {}
    for field in dataclasses.fields(cls):
        kind = _plain(hints[field.name])
        found = next((bad for t, bad in BAD.items() if kind == t), None)
        if field.name in own:
            found = own[field.name]
        if cls is Group and field.name == "schedule":
            found = BAD_SCHEDULE
        if found is not None:
            out[field.name] = found
    return out


def _bad_field(cls: type, *, depth: int = 0, skip: tuple[str, ...] = ()) -> st.SearchStrategy:
    """``(field, bad value)`` for any field of ``cls``."""
    table = {k: v for k, v in _strategies(cls, depth).items() if k not in skip}
    return st.sampled_from(sorted(table)).flatmap(lambda name: table[name].map(lambda v: (name, v)))


def test_every_recipe_field_has_a_strategy_of_bad_values():
    for cls in (Recipe, Group, LoRAConfig):
        missing = {f.name for f in dataclasses.fields(cls)} - set(_strategies(cls, 0))
        assert not missing, f"{cls.__name__} fields with no bad values here: {missing}"


MODEL = ft.Model(TinyClassifier(), task="text-classification")


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_bad_field(Recipe))
def test_compile_refuses_a_bad_value_of_any_recipe_field_with_a_config_error_naming_it(case):
    field, value = case
    with pytest.raises(ft.ConfigError) as e:
        MODEL.compile(**{field: value})
    assert f"`{field}" in str(e.value), str(e.value)


def _cli(field: str, value: typing.Any) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["schedule", "--preset", "full", "--steps", "10", "--set", f"{field}={json.dumps(value)}"])
    return code, err.getvalue()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_bad_field(Recipe))
def test_the_command_line_refuses_the_same_values_naming_the_field_with_exit_code_2(case):
    field, value = case
    code, err = _cli(field, value)
    assert code == 2, err
    assert f"`{field}" in err and "Traceback" not in err, err


@settings(max_examples=100, deadline=None)
@given(case=_bad_field(Group))
def test_a_nested_group_field_is_named_by_its_dotted_path_in_python_and_on_the_command_line(case):
    field, value = case
    with pytest.raises(ft.RulesError) as e:
        MODEL.compile(groups={"backbone": {field: value}})
    path = f"groups.backbone.{field}"
    assert f"`{path}" in str(e.value) or f"`groups.backbone`: `{field}`" in str(e.value), str(e.value)
    code, err = _cli(path, value)
    assert code == 2 and str(e.value) in err, err


def test_a_value_the_schema_takes_is_kept_as_given():
    recipe = Recipe().replace(
        learning_rate=1, warmup=0.1, groups={"head": {"lr_mult": 2}}, metrics="f1", rules=[[".*", "backbone"]]
    )
    assert recipe.learning_rate == 1.0 and recipe.warmup == 0.1 and recipe.metrics == ("f1",)
    assert recipe.groups == {"head": ft.Group(lr_mult=2.0)} and recipe.rules == ((".*", "backbone"),)
    assert math.isclose(Recipe().replace(schedule={"name": "cosine", "warmup": 10}).schedule["warmup"], 10)


X = {"x": [[0.0] * 8] * 4, "labels": [0, 1, 0, 1]}
# (public call with one bad option, the fragments its ConfigError must hold: the argument and the value)
OPTIONS = [
    ("fit-epochs", lambda: MODEL.fit(X, epochs=2.5), ["`epochs`", "epochs=2.5"]),
    ("fit-verbose", lambda: MODEL.fit(X, verbose="loud"), ["`verbose`", "verbose='loud'"]),
    ("fit-keep", lambda: MODEL.fit(X, keep=0), ["`keep`", "keep=0"]),
    ("fit-save-each-epoch", lambda: MODEL.fit(X, save_each_epoch="yes"), ["`save_each_epoch`", "'yes'"]),
    ("fit-checkpoint-dir", lambda: MODEL.fit(X, checkpoint_dir=""), ["`checkpoint_dir`", "checkpoint_dir=''"]),
    ("fit-resume", lambda: MODEL.fit(X, resume=3), ["`resume`", "resume=3"]),
    ("fit-unknown", lambda: MODEL.fit(X, epoch=2), ["`epoch`", "did you mean 'epochs'"]),
    ("evaluate-batch-size", lambda: MODEL.evaluate(X, batch_size=True), ["`batch_size`", "batch_size=True"]),
    ("predict-batch-size", lambda: MODEL.predict(X, batch_size="8"), ["`batch_size`", "batch_size='8'"]),
    ("save-pretrained-directory", lambda: MODEL.save_pretrained(None), ["`directory`", "directory=None"]),
    ("save-pretrained-metrics", lambda: MODEL.save_pretrained("d", metrics={"f1": "x"}), ["`metrics.f1`", "'x'"]),
    ("save-adapter-directory", lambda: MODEL.save_adapter(5), ["`directory`", "directory=5"]),
    ("push-private", lambda: MODEL.push_to_hub("me/x", private="no"), ["`private`", "private='no'"]),
    ("push-revision", lambda: MODEL.push_to_hub("me/x", revision=2), ["`revision`", "revision=2"]),
    ("load-allow-pickle", lambda: ft.load("nobody/x", allow_pickle="yes"), ["`allow_pickle`", "'yes'"]),
    ("load-seed", lambda: ft.load("nobody/x", seed=-1), ["`seed`", "seed=-1"]),
    ("from-config-num-labels", lambda: ft.from_config(None, num_labels=0), ["`num_labels`", "num_labels=0"]),
    ("from-config-dtype", lambda: ft.from_config(None, dtype="int8"), ["`dtype`", "dtype='int8'"]),
    ("api-fit-model", lambda: ft.fit(3, X), ["`model_or_name`", "model_or_name=3", "finetune.Model"]),
    ("api-fit-num-labels", lambda: ft.fit("nobody/x", X, num_labels=-1), ["`num_labels`", "num_labels=-1"]),
    ("early-stopping-patience", lambda: ft.callbacks.EarlyStopping(patience=1.5), ["`patience`", "patience=1.5"]),
    ("early-stopping-mode", lambda: ft.callbacks.EarlyStopping(mode="maximum"), ["`mode`", "mode='maximum'"]),
    ("early-stopping-min-delta", lambda: ft.callbacks.EarlyStopping(min_delta=NAN), ["`min_delta`", "=nan"]),
    ("jsonl-logger-path", lambda: ft.callbacks.JSONLLogger(None), ["`path`", "path=None"]),
    ("csv-logger-path", lambda: ft.callbacks.CSVLogger(3), ["`path`", "path=3"]),
    ("push-callback-strategy", lambda: ft.callbacks.PushToHub("me/x", strategy="evry"), ["`strategy`", "'evry'"]),
    ("push-callback-timeout", lambda: ft.callbacks.PushToHub("me/x", checkpoint_timeout=0), ["`checkpoint_timeout`"]),
    ("push-callback-card", lambda: ft.callbacks.PushToHub("me/x", license=3), ["`license`", "license=3"]),
    ("push-callback-unknown", lambda: ft.callbacks.PushToHub("me/x", privat=True), ["`privat`", "'private'"]),
    ("group-positional", lambda: ft.Group(0), ["`lr_mult`", "lr_mult=0", "trainable=False"]),
    ("layer-decay-layer", lambda: ft.LayerDecay(0.5, 4, layer=1.5), ["`layer`", "layer=1.5"]),
    ("schedule-learning-rate", lambda: make_schedule("cosine", learning_rate=NAN), ["`learning_rate`", "=nan"]),
]


@pytest.mark.parametrize("case, call, fragments", OPTIONS, ids=[o[0] for o in OPTIONS])
def test_every_public_call_refuses_a_bad_option_naming_it(tmp_path, monkeypatch, case, call, fragments):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ft.ConfigError) as e:
        call()
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_a_phase_keeping_the_recipe_optimizer_is_checked_against_it():
    phase = {"epochs": 1, "optimizer_options": {"momentum": 0.9}}
    assert Recipe(optimizer="sgd", phases=[phase]).phases == (phase,)
    with pytest.raises(ft.ConfigError, match=r"`phases\[0\]\.optimizer_options\.momentum` .* 'adamw'"):
        Recipe(optimizer="adamw", phases=[phase])
    with pytest.raises(ft.ConfigError, match=r"`phases\[0\]\.optimizer_options\.momentum` .* 'adam'"):
        Recipe(optimizer="sgd", phases=[{**phase, "optimizer": "adam"}])


def test_a_preset_file_with_a_bad_field_is_named(monkeypatch):
    from finetune import presets

    monkeypatch.setattr(presets, "_load_all", lambda: {"broken": {"name": "broken", "learning_rate": "fast"}})
    with pytest.raises(ft.ConfigError, match=r"broken\.toml .*`learning_rate` .* received learning_rate='fast'"):
        presets.get("broken")
