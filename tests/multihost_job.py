"""One process of the multi-host test: ``python -m tests.multihost_job BERT_DIR OUT_DIR [--process-id I ...]``.

With ``--distributed`` it joins a 2-process JAX run on 127.0.0.1 (CPU, gloo collectives; the coordinator address,
process count and id come from ``--coordinator`` / ``--num-processes`` / ``--process-id`` or, when those are missing,
from the ``JAX_*`` environment variables), trains
the tiny BERT data-parallel over all processes, checkpoints, exports, and writes its final parameters to
``OUT_DIR/params-<process>.npz``. Without it, it trains the same run in one process (``params-single.npz``) and
restores the multi-process checkpoint from ``OUT_DIR/ckpt`` (``restored.npz``).
"""

import argparse
import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.pop("XLA_FLAGS", None)  # one CPU device per process

import jax  # noqa: E402
import numpy as np  # noqa: E402

import finetune as ft  # noqa: E402
from finetune import sharding  # noqa: E402
from finetune.params.rules import flatten  # noqa: E402
from finetune.training.checkpoint import Checkpointer  # noqa: E402

STEPS, BATCH = 6, 8


def tokens(n: int, length: int = 16) -> dict:
    rng = np.random.default_rng(0)
    mask = (np.arange(length) < rng.integers(4, length + 1, n)[:, None]).astype(np.int32)
    ids = rng.integers(1, 256, (n, length)).astype(np.int32) * mask
    return {"input_ids": ids, "attention_mask": mask, "labels": rng.integers(0, 2, n).astype(np.int32)}


def host(tree) -> dict:
    """``{path: numpy}``; replicated arrays spanning processes are read from this process's copy."""
    return {k: np.asarray(v.addressable_data(0)) for k, v in flatten(tree).items()}


def train(bert: str, **fit):
    model = ft.load(bert, task="text-classification", num_labels=2)
    model.compile(optimizer="adamw", learning_rate=1e-3, weight_decay=0.01, log_every=1)
    model.fit(tokens(32), steps=STEPS, batch_size=BATCH, verbose=0, **fit)
    return model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("bert")
    parser.add_argument("out")
    parser.add_argument("--distributed", action="store_true")
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    args = parser.parse_args()
    if not args.distributed:  # the one-process reference, then the multi-process checkpoint restored here
        model = train(args.bert)
        state = model.trainer.state
        np.savez(f"{args.out}/params-single.npz", **host(state["params"]))
        restored, _ = Checkpointer(f"{args.out}/ckpt").restore(None, state)
        np.savez(f"{args.out}/restored.npz", **host(restored["params"]))
        return
    sharding.initialize(args.coordinator, args.num_processes, args.process_id)  # None: from the environment
    assert jax.process_count() == 2, jax.process_count()
    model = train(args.bert, mesh="data", checkpoint_dir=f"{args.out}/ckpt")
    np.savez(f"{args.out}/params-{jax.process_index()}.npz", **host(model.trainer.state["params"]))
    model.save_pretrained(f"{args.out}/export-{jax.process_index()}")  # every process calls it; only process 0 writes
    print(f"process {jax.process_index()} done")


if __name__ == "__main__":
    main()
