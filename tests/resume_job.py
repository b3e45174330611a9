"""A training run for the resume tests, run as a subprocess: ``python -m tests.resume_job OUT CKPT [--kill-at N]``.

Trains the tiny classifier (with dropout, so the RNG state matters) for 3 epochs with checkpoints every 4 steps, and
writes the final parameters to OUT (.npz). ``--kill-at N`` sends itself SIGKILL right after step N, and
``--kill-in-save`` does so while a checkpoint write is in flight.
"""

import argparse
import os
import signal

import numpy as np

import finetune as ft
from tests.tiny import TinyClassifier, blobs, params_of


class KillAt(ft.callbacks.Callback):
    def __init__(self, step: int, in_save: bool):
        self.step, self.in_save = step, in_save

    def on_step_end(self, step, logs=None):
        if step >= self.step:
            if self.in_save:  # start a checkpoint write and die before it completes
                self.trainer._save(self.trainer._run, 0, 0, 0, 0)
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("ckpt")
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--kill-in-save", action="store_true")
    args = parser.parse_args()
    x, y = blobs(100)
    model = ft.Model(TinyClassifier(dropout=0.2), task="text-classification")
    model.compile(optimizer="adamw", learning_rate=1e-2, schedule="cosine", warmup=0.1, log_every=1, seed=3)
    callbacks = [KillAt(args.kill_at, args.kill_in_save)] if args.kill_at else []
    model.fit(
        (x, y),
        epochs=3,
        batch_size=16,
        verbose=0,
        callbacks=callbacks,
        checkpoint_dir=args.ckpt,
        save_every=4,
        resume=True,
    )
    np.savez(args.out, **params_of(model))


if __name__ == "__main__":
    main()
