"""The 8-device sharding checks, run as a subprocess: ``python -m tests.sharding_job BERT_DIR WORK_DIR``.

JAX sees 8 fake CPU devices here (the flag must be set before jax is imported, so this cannot run inside the main
test process). A tiny BERT classifier is trained for 20 steps on one device and under every strategy; the job prints
one JSON object with the losses, parameter differences, shardings, bytes per device and the error messages of the
misconfigurations, and `tests/test_sharding.py` asserts on it.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import finetune as ft  # noqa: E402
from finetune import sharding  # noqa: E402
from finetune.params.rules import flatten, path_str  # noqa: E402
from tests.tiny import TinyClassifier, blobs, params_of  # noqa: E402

STEPS, BATCH = 20, 16
RUNS = {  # name -> (load mesh, compile sharding, fit mesh): every way of asking
    "data": (None, None, "data"),
    "fsdp": ("fsdp", None, None),
    "tensor": ("tensor", None, None),
    "fsdp+tensor": (None, "fsdp+tensor", {"data": 4, "model": 2}),
}


def tokens(n: int = 64, length: int = 16) -> dict:
    rng = np.random.default_rng(0)
    mask = (np.arange(length) < rng.integers(4, length + 1, n)[:, None]).astype(np.int32)
    ids = rng.integers(1, 256, (n, length)).astype(np.int32) * mask
    return {"input_ids": ids, "attention_mask": mask, "labels": rng.integers(0, 2, n).astype(np.int32)}


def train(bert, load_mesh=None, compile_sharding=None, fit_mesh=None, **fit):
    model = ft.load(bert, task="text-classification", num_labels=2, mesh=load_mesh)
    loaded = {p: v.get_value().sharding for p, v in _flat_params(model)}
    model.compile(optimizer="adamw", learning_rate=1e-3, weight_decay=0.01, log_every=1, sharding=compile_sharding)
    history = model.fit(tokens(), steps=STEPS, batch_size=BATCH, verbose=0, mesh=fit_mesh, **fit)
    return model, history, loaded


def _flat_params(model):
    return [(path_str(p), v) for p, v in nnx.to_flat_state(nnx.state(model.module, nnx.Param))]


def opt_check(state) -> dict:
    """Every optimizer-state leaf at a parameter's path, compared with that parameter's sharding."""
    params = {path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
    matched, wrong = 0, []
    for kp, leaf in jax.tree_util.tree_flatten_with_path(state["opt"])[0]:
        keys = path_str(kp).split("/")
        hit = next(("/".join(keys[i:]) for i in range(len(keys)) if "/".join(keys[i:]) in params), None)
        if hit is None or np.shape(leaf) != params[hit].shape:
            continue
        matched += 1
        if leaf.sharding != params[hit].sharding:
            wrong.append(f"{path_str(kp)}: {leaf.sharding} != {params[hit].sharding}")
    return {"matched": matched, "params": len(params), "wrong": wrong}


def describe(model, history, loaded, baseline) -> dict:
    state, layout = model.trainer.state, model.trainer.layout
    expected = flatten((model.trainer.program.shardings or {"params": {}})["params"])
    params = flatten(state["params"])
    per_device = sharding.bytes_per_device(state["params"])
    return {
        "losses": [s["loss"] for s in history.steps],
        "param_diff": max(float(np.abs(v - baseline[k]).max()) for k, v in params_of(model).items()),
        "specs": {k: str(getattr(v.sharding, "spec", "single device")) for k, v in params.items()},
        "drifted": [k for k, v in params.items() if expected and v.sharding != expected[k]],
        "load_differs": [k for k, s in loaded.items() if s != params[k].sharding],
        "opt": opt_check(state),
        "bytes_per_device": sorted(set(per_device.values())),
        "total_bytes": sum(v.nbytes for v in params.values()),
        "replicated_bytes": sum(v.nbytes for v in params.values() if v.sharding.is_fully_replicated),
        "mesh": dict(layout.mesh.shape) if layout is not None else {},
    }


def resume_from(checkpoints, step, target, bert, **mesh):
    """Copies ``checkpoints`` keeping only ``step``, resumes there to STEPS and returns the finished model."""
    shutil.copytree(checkpoints, target)
    for other in os.listdir(target):
        if other.isdigit() and int(other) != step:
            shutil.rmtree(os.path.join(target, other))
    model, history, _ = train(bert, checkpoint_dir=target, resume=True, **mesh)
    return model, history


def error_of(fn) -> str:
    try:
        fn()
    except ft.ConfigError as e:
        return str(e)
    return "no error"


class Odd(nnx.Module):
    """A matrix with no dimension that 8 divides."""

    def __init__(self):
        self.layer = nnx.Linear(3, 5, rngs=nnx.Rngs(0))

    def __call__(self, x):
        return self.layer(x)


def errors(bert) -> dict:
    x, y = blobs(32, features=8)
    tiny = ft.Model(TinyClassifier(), task="text-classification").compile(learning_rate=1e-2)
    odd = ft.Model(Odd(), task="text-classification").compile(learning_rate=1e-2)
    x3, y3 = blobs(32, features=3, classes=5)
    return {
        "batch": error_of(lambda: tiny.fit((x, y), steps=1, batch_size=12, verbose=0, mesh="data")),
        "unnamed_tensor": error_of(lambda: tiny.fit((x, y), steps=1, batch_size=8, verbose=0, mesh="tensor")),
        "fsdp_matrix": error_of(lambda: odd.fit((x3, y3), steps=1, batch_size=8, verbose=0, mesh="fsdp")),
        "divide": error_of(
            lambda: ft.load(bert, task="text-classification", num_labels=2, mesh="data").fit(
                tokens(), steps=1, batch_size=8, verbose=0, sharding_rules={"classes": "data"}
            )
        ),
        "unused_rule": error_of(
            lambda: tiny.fit((x, y), steps=1, batch_size=8, verbose=0, mesh="fsdp", sharding_rules={"vocab": "model"})
        ),
    }


def load_spy(bert) -> dict:
    """What loading with a mesh hands to `finetune.sharding.put`: host arrays and 8-device shardings."""
    calls, original = [], sharding.put
    sharding.put = lambda x, s: calls.append((type(x).__name__, len(s.device_set))) or original(x, s)
    try:
        model = ft.load(bert, task="text-classification", num_labels=2, mesh="fsdp")
    finally:
        sharding.put = original
    device0 = sharding.bytes_per_device(nnx.state(model.module, nnx.Param))
    return {"calls": sorted(set(calls)), "count": len(calls), "bytes_per_device": sorted(set(device0.values()))}


def main():
    bert, work = sys.argv[1], sys.argv[2]
    start = time.perf_counter()
    out = {"devices": jax.device_count()}
    model, history, loaded = train(bert, checkpoint_dir=f"{work}/single", save_every=10)
    baseline = params_of(model)
    out["single"] = describe(model, history, loaded, baseline)
    for name, (load_mesh, compile_sharding, fit_mesh) in RUNS.items():
        extra = {"checkpoint_dir": f"{work}/fsdp", "save_every": 10} if name == "fsdp" else {}
        model, history, loaded = train(bert, load_mesh, compile_sharding, fit_mesh, **extra)
        out[name] = describe(model, history, loaded, baseline)
    model, history = resume_from(f"{work}/single", 10, f"{work}/single_to_fsdp", bert, load_mesh="fsdp")
    out["single_to_fsdp"] = describe(model, history, {}, baseline)
    model, history = resume_from(f"{work}/fsdp", 10, f"{work}/fsdp_to_single", bert)
    out["fsdp_to_single"] = describe(model, history, {}, baseline)
    out["errors"] = errors(bert)
    out["load"] = load_spy(bert)
    out["seconds"] = time.perf_counter() - start
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
