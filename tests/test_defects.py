"""The defects found beside the bad-input catalogue: predict per task, labels taken from the data by `finetune.fit`,
the optimizer-state column of `summary` before `fit`, and the benchmark scripts run as files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest

import finetune as ft
from tests.test_data_tasks import WORDS, bert_dir
from tests.tiny import TinyClassifier, blobs

ROOT = Path(__file__).resolve().parents[1]


def _state_column(report: str) -> dict[str, str]:
    """``{group: optimizer-state cell}`` from the group table of a `summary` report."""
    lines = report.split("\n\n")[0].splitlines()
    start = lines[0].index("optimizer state")
    return {line.split()[0]: line[start:].strip() for line in lines[2:]}


def test_summary_shows_the_optimizer_state_before_fit_as_fit_builds_it():
    x, y = blobs(32)
    model = ft.Model(TinyClassifier(), task="text-classification")
    model.compile(optimizer="adamw", learning_rate=1e-3, groups={"head": ft.Group(trainable=False)})
    before = _state_column(model.summary(paths=True, printed=False))
    model.fit((x, y), epochs=1, batch_size=16, verbose=0)
    after = _state_column(model.summary(paths=True, printed=False))
    assert before == after
    # adamw keeps two float32 moments per parameter (and a few scalars): the classifier has 16 * 3 + 3 = 51
    new_bytes = int(before["new"].removesuffix(" B"))
    assert 2 * 51 * 4 <= new_bytes < 2 * 51 * 4 + 64
    assert before["head"] == "0 B"


def test_overhead_benchmark_runs_as_a_file_from_any_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = ROOT / "tests" / "benchmarks" / "overhead.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--only", "tiny", "--steps", "1", "--repeats", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["results"]["tiny"]["fit_steps_per_s"] > 0


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory):
    """A tiny BERT without a head, with a word-piece tokenizer: what `finetune.fit` loads by name."""
    return bert_dir(tmp_path_factory.mktemp("base"), "BertModel")


def _texts(n: int) -> list[str]:
    return [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(3)) for i in range(n)]


LABEL_SOURCES = {
    "classlabel-feature-names": (
        lambda: datasets.Dataset.from_dict(
            {"text": _texts(8), "label": [0, 1] * 4},
            features=datasets.Features(
                {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["a", "b", "c", "d"])}
            ),
        ),
        "text-classification",
        4,
        {0: "a", 1: "b", 2: "c", 3: "d"},
    ),
    "distinct-strings-sorted": (
        lambda: {"text": _texts(8), "label": ["pos", "neg", "meh", "pos"] * 2},
        "text-classification",
        3,
        {0: "meh", 1: "neg", 2: "pos"},
    ),
    "int-ids-max-plus-one": (lambda: (_texts(8), [0, 4, 2, 0] * 2), "text-classification", 5, None),
    "float-targets-regression": (
        lambda: {"sentence": _texts(8), "target": [0.5, 1.25, 3.0, 2.5] * 2},
        "text-classification",
        1,
        None,
    ),
    "token-tag-strings": (
        lambda: {"tokens": [t.split() for t in _texts(8)], "tags": [["O", "B", "I"]] * 8},
        "token-classification",
        3,
        {0: "B", 1: "I", 2: "O"},
    ),
}


@pytest.mark.parametrize("source", LABEL_SOURCES, ids=list(LABEL_SOURCES))
def test_one_call_fit_sizes_a_new_head_and_names_its_labels_from_the_data(bert_base, source):
    make, task, size, names = LABEL_SOURCES[source]
    model, history = ft.fit(bert_base, make(), task=task, steps=1, batch_size=4, max_length=16, verbose=0)
    assert model.hf_config.num_labels == size
    if names is not None:
        assert model.id2label == names and model.hf_config.label2id == {v: k for k, v in names.items()}
    assert np.isfinite(history.steps[-1]["loss"])
