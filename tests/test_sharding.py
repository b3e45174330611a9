"""Sharding: the rules table, its errors, one device, and (in a subprocess with 8 fake CPU devices) every strategy.

The 8-device run (`tests/sharding_job.py`) happens once per module; its tests assert on its JSON report.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import finetune as ft
from finetune import sharding
from finetune.cli import build_parser
from finetune.params.rules import path_str
from tests.tiny import TinyClassifier, blobs, params_of

ROOT = Path(__file__).resolve().parents[1]


def layout(strategy, data=1, model=1, **rules):
    """A layout over an abstract mesh (no devices needed to compute specs)."""
    base = dict(sharding.DEFAULT_RULES)
    base.update(rules)
    return sharding.Layout(AbstractMesh((data, model), ("data", "model")), strategy, base, tuple(rules))


def spec(lay, shape, names):
    problems = []
    return lay.spec("p", shape, names, problems), problems


# ----------------------------------------------------------------------------------------------- one process, 1 device
def test_rules_table_puts_heads_and_mlp_on_the_model_axis_and_fsdp_on_the_largest_dimension():
    assert spec(layout("tensor", model=8), (64, 128), ("embed", "mlp")) == (P(None, "model"), [])
    assert spec(layout("tensor", model=8), (64, 64), ("heads", "embed")) == (P("model"), [])
    assert spec(layout("fsdp", data=8), (64, 128), ("embed", "mlp")) == (P(None, "data"), [])
    assert spec(layout("fsdp+tensor", data=4, model=2), (64, 128), ("embed", "mlp")) == (P("data", "model"), [])
    assert spec(layout("fsdp", data=8), (64,), ("norm",)) == (P("data"), [])
    assert spec(layout("fsdp", data=8), (2,), ("classes",)) == (P(), [])  # a 2-label bias: a few bytes, replicated
    assert spec(layout("data", data=8), (64, 128), ("embed", "mlp")) == (P(), [])


def test_user_rules_override_the_table():
    assert spec(layout("tensor", model=4, vocab="model"), (256, 64), ("vocab", "embed")) == (P("model"), [])
    assert spec(layout("tensor", model=4, mlp=None), (64, 128), ("embed", "mlp")) == (P(), [])


def test_a_dimension_that_does_not_divide_the_mesh_names_parameter_shape_and_fix():
    _, problems = spec(layout("tensor", model=8), (64, 132), ("embed", "mlp"))
    assert "`p` with shape (64, 132)" in problems[0] and "'mlp', size 132" in problems[0]
    assert "map 'mlp' to None in sharding_rules" in problems[0]


def test_silent_replication_under_fsdp_or_tensor_is_an_error():
    _, problems = spec(layout("tensor", model=8), (16, 16), None)
    assert "no logical axis names" in problems[0] and "silently stay replicated" in problems[0]
    _, problems = spec(layout("fsdp", data=8), (3, 5), None)
    assert "no free dimension divides the data-axis size 8" in problems[0]


def test_every_problem_is_reported_at_once_with_the_mesh():
    module = nnx.eval_shape(lambda: TinyClassifier())
    variables = {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(module))}
    with pytest.raises(ft.ConfigError) as e:
        layout("tensor", model=8).variable_shardings(variables)
    message = str(e.value)
    assert "strategy 'tensor' on the mesh {'data': 1, 'model': 8} (4 problem(s))" in message
    assert all(f"`{p}/kernel`" in message for p in ("encoder/0", "encoder/1", "head", "classifier"))


def test_resolve_combines_a_strategy_and_a_shape_and_refuses_what_it_cannot_build():
    assert sharding.resolve() is None
    lay = sharding.resolve("fsdp", {"data": 1, "model": 1})
    assert (lay.strategy, dict(lay.mesh.shape), lay.explicit_shape) == ("fsdp", {"data": 1, "model": 1}, True)
    assert sharding.resolve(lay, "tensor").strategy == "tensor"
    assert sharding.parse_mesh("data=4,model=2") == {"data": 4, "model": 2}
    assert sharding.parse_mesh("fsdp") == "fsdp"
    for bad in ("zero", {"data": 2}, {"pipeline": 1}):
        with pytest.raises(ft.ConfigError):
            sharding.resolve(bad)
    with pytest.raises(ft.ConfigError, match="sharding_rules"):
        sharding.resolve("data", rules={"vocab": "pipeline"})


def test_the_same_code_runs_on_one_device_with_any_strategy():
    x, y = blobs(64)

    def run(mesh):
        model = ft.Model(TinyClassifier(), task="text-classification").compile(learning_rate=1e-2, log_every=1)
        history = model.fit((x, y), epochs=2, batch_size=16, verbose=0, mesh=mesh)
        return [s["loss"] for s in history.steps], params_of(model)

    (plain, p0), (fsdp, p1) = run(None), run("fsdp")
    np.testing.assert_allclose(fsdp, plain, atol=1e-6)
    for k in p0:
        np.testing.assert_allclose(p1[k], p0[k], atol=1e-6)


def test_cli_fit_takes_mesh_and_distributed():
    args = build_parser().parse_args(["fit", "--mesh", "data=4,model=2", "--mesh", "fsdp", "--distributed"])
    assert args.distributed and [sharding.parse_mesh(m) for m in args.mesh] == [{"data": 4, "model": 2}, "fsdp"]


def test_initialize_reads_the_usual_environment_variables_and_picks_gloo(monkeypatch):
    calls, updates = [], []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(jax.config, "update", lambda *a: updates.append(a))
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    sharding.initialize()
    sharding.initialize("127.0.0.1:99", 2, 0)  # arguments win
    assert calls == [("10.0.0.1:1234", 4, 3), ("127.0.0.1:99", 2, 0)]
    assert ("jax_cpu_collectives_implementation", "gloo") in updates
    assert sharding.is_main_process()


# ----------------------------------------------------------------------------------------------- 8 fake CPU devices
@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    from tests.models.reference import tiny_bert

    work = tmp_path_factory.mktemp("sharding")
    _, bert = tiny_bert(work / "bert", "BertForSequenceClassification")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.sharding_job", str(bert), str(work)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


STRATEGIES = ["data", "fsdp", "tensor", "fsdp+tensor"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_matches_the_single_device_loss_over_20_steps(eight, strategy):
    assert eight["devices"] == 8
    single, run = eight["single"], eight[strategy]
    assert len(run["losses"]) == len(single["losses"]) == 20
    np.testing.assert_allclose(run["losses"], single["losses"], atol=1e-5, rtol=0)
    assert run["param_diff"] < 1e-5


def test_strategies_build_the_meshes_they_promise(eight):
    assert eight["data"]["mesh"] == {"data": 8, "model": 1}
    assert eight["fsdp"]["mesh"] == {"data": 8, "model": 1}
    assert eight["tensor"]["mesh"] == {"data": 1, "model": 8}
    assert eight["fsdp+tensor"]["mesh"] == {"data": 4, "model": 2}  # compile(sharding=) + fit(mesh={...})


def test_fsdp_splits_parameter_bytes_by_the_data_axis_size(eight):
    run = eight["fsdp"]
    (per_device,) = run["bytes_per_device"]
    assert run["replicated_bytes"] == 8  # only the (2,) classifier bias: 2 does not divide over 8 devices
    assert per_device == (run["total_bytes"] - 8) // 8 + 8
    assert eight["data"]["bytes_per_device"] == [eight["data"]["total_bytes"]]


def test_tensor_splits_heads_and_mlp_over_the_model_axis(eight):
    specs = eight["tensor"]["specs"]
    assert specs["encoder/layers/0/attention/query/kernel"] == "P(None, 'model')"
    assert specs["encoder/layers/0/attention/output/kernel"] == "P('model',)"
    assert specs["encoder/layers/1/intermediate/kernel"] == "P(None, 'model')"
    assert specs["embeddings/word_embeddings/embedding"] == "P()"
    assert eight["fsdp+tensor"]["specs"]["encoder/layers/0/intermediate/kernel"] == "P('data', 'model')"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_optimizer_state_takes_exactly_the_shardings_of_its_parameters(eight, strategy):
    opt = eight[strategy]["opt"]
    assert opt["wrong"] == []
    assert opt["matched"] == 2 * opt["params"]  # adamw: mu and nu of every parameter


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_shardings_do_not_drift_during_training(eight, strategy):
    assert eight[strategy]["drifted"] == []


def test_loading_with_a_mesh_puts_each_weight_straight_into_its_sharding(eight):
    load = eight["load"]
    assert load["calls"] == [["ndarray", 8]]  # host arrays, straight to 8-device shardings
    assert load["count"] == len(eight["fsdp"]["specs"])
    assert load["bytes_per_device"] == eight["fsdp"]["bytes_per_device"]
    assert eight["fsdp"]["load_differs"] == eight["tensor"]["load_differs"] == []


def test_checkpoints_restore_from_one_device_onto_a_mesh_and_back(eight):
    for name in ("single_to_fsdp", "fsdp_to_single"):
        run = eight[name]
        assert run["param_diff"] < 1e-5, name
        np.testing.assert_allclose(run["losses"], eight["single"]["losses"], atol=1e-5, rtol=0)
    assert eight["single_to_fsdp"]["bytes_per_device"] == eight["fsdp"]["bytes_per_device"]
    assert set(eight["fsdp_to_single"]["specs"].values()) == {"single device"}


def test_misconfigurations_on_8_devices_are_config_errors_naming_parameter_shape_mesh_and_fix(eight):
    errors = eight["errors"]
    assert "`batch_size`=12 does not divide over the data axis" in errors["batch"]
    assert "multiple of 8 (e.g. 16)" in errors["batch"]
    assert "`classifier/kernel` with shape (64, 2)" in errors["divide"]
    assert "{'data': 8, 'model': 1}" in errors["divide"] and "Fix:" in errors["divide"]
    assert "`encoder/0/kernel` with shape (8, 16) has no logical axis names" in errors["unnamed_tensor"]
    assert "`layer/kernel` with shape (3, 5): no free dimension divides" in errors["fsdp_matrix"]
    assert "sharding_rules maps 'vocab', and no parameter has that logical axis" in errors["unused_rule"]
