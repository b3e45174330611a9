"""A training run for the resume tests, run as a subprocess: ``python -m tests.resume_job OUT CKPT [--kill-at N]``.

Trains the tiny classifier (with dropout, so the RNG state matters) for 3 epochs with checkpoints every 4 steps, and
writes the final parameters to OUT (.npz). ``--kill-at N`` sends itself SIGKILL right after step N, and
``--kill-in-save`` does so while a checkpoint write is in flight; ``--term-at N`` sends SIGTERM instead (preemption).
"""

import argparse
import os
import signal

import numpy as np

import finetune as ft
from tests.tiny import TinyClassifier, blobs, params_of


class KillAt(ft.callbacks.Callback):
    def __init__(self, step: int, in_save: bool, sig: int = signal.SIGKILL):
        self.step, self.in_save, self.sig = step, in_save, sig

    def on_step_end(self, step, logs=None):
        if step == self.step and self.sig != signal.SIGKILL:  # a polite stop: the trainer checkpoints, then exits
            os.kill(os.getpid(), self.sig)
        elif step >= self.step:
            if self.in_save:  # start a checkpoint write and die before it completes
                self.trainer.save_checkpoint()
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("ckpt")
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--kill-in-save", action="store_true")
    parser.add_argument("--term-at", type=int)
    args = parser.parse_args()
    x, y = blobs(100)
    model = ft.Model(TinyClassifier(dropout=0.2), task="text-classification")
    model.compile(optimizer="adamw", learning_rate=1e-2, schedule="cosine", warmup=0.1, log_every=1, seed=3)
    callbacks = [KillAt(args.kill_at, args.kill_in_save)] if args.kill_at else []
    if args.term_at:
        callbacks = [KillAt(args.term_at, False, signal.SIGTERM)]
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
