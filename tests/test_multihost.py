"""Several hosts: 2 JAX processes on 127.0.0.1 (CPU, gloo) train data-parallel like one process would.

`tests/multihost_job.py` runs each process; process 0 gets its coordinator, process count and id as arguments and
process 1 from the ``JAX_*`` environment variables.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(bert, out, *args, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.multihost_job", str(bert), str(out), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc, timeout=300) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"process timed out:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    return output


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tests.models.reference import tiny_bert

    out = tmp_path_factory.mktemp("multihost")
    _, bert = tiny_bert(out / "bert", "BertForSequenceClassification")
    address = f"127.0.0.1:{_free_port()}"
    by_env = {"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    workers = [
        _job(bert, out, "--distributed", "--coordinator", address, "--num-processes", "2", "--process-id", "0"),
        _job(bert, out, "--distributed", env=by_env),
    ]
    try:
        logs = [_finish(w) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    _finish(_job(bert, out))  # the one-process reference, which also restores the 2-process checkpoint
    return out, logs


def _params(path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_two_processes_train_data_parallel_to_the_parameters_of_one_process(run):
    out, logs = run
    assert "process 0 done" in logs[0] and "process 1 done" in logs[1]
    p0, p1, single = (_params(out / f"params-{name}.npz") for name in ("0", "1", "single"))
    assert p0.keys() == single.keys() and len(p0) > 10
    for k in p0:
        np.testing.assert_array_equal(p0[k], p1[k])
        np.testing.assert_allclose(p0[k], single[k], atol=1e-5, rtol=0, err_msg=k)


def test_a_checkpoint_written_by_two_processes_restores_in_one(run):
    out, _ = run
    p0, restored = _params(out / "params-0.npz"), _params(out / "restored.npz")
    for k in p0:
        np.testing.assert_array_equal(restored[k], p0[k])


def test_only_process_0_writes_the_export(run):
    out, _ = run
    assert (out / "export-0" / "model.safetensors").is_file()
    assert not (out / "export-1").exists()
