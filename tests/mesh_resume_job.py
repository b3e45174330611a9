"""A checkpoint written under a mesh, resumed on one device, run as a subprocess: ``python -m tests.mesh_resume_job
WORK_DIR``. JAX sees 2 fake CPU devices (the flag must be set before jax is imported). Prints one JSON object that
`tests/test_nothing_lost.py` asserts on."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402

import finetune as ft  # noqa: E402
from finetune.training.checkpoint import read_meta  # noqa: E402
from tests.test_data_tasks import bert_dir, reviews  # noqa: E402
from tests.tiny import params_of  # noqa: E402

STEPS, BATCH = 6, 8


def train(path, work, **fit):
    model = ft.load(path, task="text-classification", num_labels=2)
    model.compile(optimizer="adamw", learning_rate=1e-3, log_every=1)
    data = datasets.Dataset.from_dict(reviews(32))
    history = model.fit(data, steps=STEPS, batch_size=BATCH, verbose=0, checkpoint_dir=work, save_every=3, **fit)
    return model, [s["loss"] for s in history.steps]


def main():
    work = sys.argv[1]
    path = bert_dir(f"{work}/bert")
    mesh_model, mesh_losses = train(path, f"{work}/mesh", mesh="data")
    shutil.copytree(f"{work}/mesh", f"{work}/resumed", ignore=shutil.ignore_patterns(str(STEPS), ".finetune.*"))
    model, resumed_losses = train(path, f"{work}/resumed", resume=True)  # one device, packing=None
    _, _ = train(path, f"{work}/single")  # a fresh one-device run packs
    try:  # a packed run cannot continue packed on a mesh
        train(path, f"{work}/single", mesh="data", resume=True)
        packed_to_mesh = "no error"
    except ft.ConfigError as e:
        packed_to_mesh = str(e)
    mesh, resumed = params_of(mesh_model), params_of(model)
    out = {
        "packed_on_one_device": read_meta(f"{work}/single")["packed"],
        "mesh_losses": mesh_losses,
        "resumed_losses": resumed_losses,
        "steps": STEPS,
        "resumed_steps": read_meta(f"{work}/resumed")["step"],
        "packed_to_mesh": packed_to_mesh,
        "param_diff": max(float(np.abs(v - mesh[k]).max()) for k, v in resumed.items()),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
