"""The defects found beside the bad-input catalogue: predict per task, labels taken from the data by `finetune.fit`,
the optimizer-state column of `summary` before `fit`, and the benchmark scripts run as files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import finetune as ft
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
