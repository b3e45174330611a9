"""The log intervals of a training phase: reading each interval's metric sums, skipped steps and learning rates off
the device (`Intervals.start`), and reporting them (`Intervals.flush`): history, progress bar, callbacks."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from finetune import metrics as metrics_lib
from finetune import optim
from finetune.training import nonfinite
from finetune.training.callbacks import Callback
from finetune.training.history import History
from finetune.training.stacking import Stacking


class Intervals:
    """The log intervals of one phase: the read in flight, and what the next report measures from.

    With several steps per call a report waits until the next call is on its way, so the device never idles while
    the host handles a log; with one step per call (big models) it is reported at once.
    """

    def __init__(
        self,
        program: Any,
        log_values: Callable,
        *,
        done: int,
        skipped: int,
        batch_size: int,
        history: History,
        callbacks: Sequence[Callback],
        bar: Any,
        stacking: Stacking,
    ):
        self.program, self.log_values, self.batch_size = program, log_values, batch_size
        self.history, self.callbacks, self.bar, self.stacking = history, callbacks, bar, stacking
        self.pending: Any = None  # ((flat values, zeroed sums), step in phase, global step) being read
        self.last = (done, time.perf_counter())  # the step in phase and time of the last report
        self.skipped_seen = skipped  # the optimizer's count of skipped steps at the last read
        self.epoch_skipped = 0  # steps skipped in the current epoch
        self.epoch_first = 1  # the current epoch's first step
        self.warned: tuple = ()  # the steps of the last interval warned about as all skipped

    def begin_epoch(self, first_step: int) -> None:
        self.epoch_skipped, self.epoch_first = 0, first_step

    def start(self, state: dict, step: int, global_step: int) -> dict:
        """Starts the read of the interval ending at ``step`` (in the phase); returns the state with zeroed sums."""
        self.pending = (self.program.start_read(state, self.log_values), step, global_step)
        return {**state, "acc": self.pending[0][1]}

    def flush(self, epoch_acc: dict, *, state: dict, global_step: int, recipe: Any) -> dict:
        """Reports the pending interval, if any; returns the epoch's metric sums with it added."""
        if self.pending is None:
            return epoch_acc
        ((flat, _), step, interval_end), self.pending = self.pending, None
        # Only scalars and metric sums come to the host (the moments may span hosts), in one transfer.
        acc, (consecutive, total), lrs = self.program.finish_read(flat)
        epoch_acc = jax.tree.map(lambda a, b: np.asarray(a) + b, epoch_acc, acc)
        if int(consecutive) >= recipe.max_nonfinite:
            limit = recipe.max_nonfinite
            raise nonfinite.error(state, step=step, consecutive=int(consecutive), limit=limit, global_step=global_step)
        skipped, self.skipped_seen = int(total) - self.skipped_seen, int(total)
        self.epoch_skipped += skipped
        first = interval_end - (step - self.last[0]) + 1  # the interval's first step
        if nonfinite.warn_all_skipped("The log interval", skipped, first, interval_end):
            self.warned = (first, interval_end)
        logs = metrics_lib.results(self.program.metrics, acc)
        logs.update({f"lr/{g}": float(v) for g, v in lrs.items()})
        now = time.perf_counter()
        logs["examples_per_s"] = (step - self.last[0]) * self.batch_size / max(now - self.last[1], 1e-9)
        logs["skipped"], logs["skipped_steps"] = int(total), skipped  # so far in this phase; in this interval
        self.history.add_step(interval_end, logs)
        self._show(step, logs, skipped)
        for cb in self.callbacks:
            cb.on_step_end(interval_end, logs)
        self.stacking.logged((now - self.last[1]) / max(step - self.last[0], 1), recipe)
        self.last = (step, now)
        return epoch_acc

    def _show(self, step: int, logs: dict, skipped: int) -> None:
        """The progress bar: the interval's metrics, one LR when the groups share it (else each group's), ex/s."""
        self.bar.update(step - self.bar.n)
        hidden = ("skipped", "examples_per_s") + (("skipped_steps",) if not skipped else ())
        shown = {k: v for k, v in logs.items() if not k.startswith("lr/") and k not in hidden}
        lrs = {k[3:]: v for k, v in logs.items() if k.startswith("lr/")}
        if lrs:
            shown.update(
                {"lr": max(lrs.values())} if len(set(lrs.values())) == 1 else {f"lr_{g}": v for g, v in lrs.items()}
            )
        shown["ex/s"] = logs["examples_per_s"]
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})

    def finish_epoch(self, epoch_acc: dict, *, state: dict, done: int, global_step: int, recipe: Any):
        """Reports what is left of the epoch (the pending interval, and a last partial one); returns the state and
        the epoch's sums."""
        epoch_acc = self.flush(epoch_acc, state=state, global_step=global_step, recipe=recipe)
        if done > self.last[0]:
            state = self.start(state, done, global_step)
            epoch_acc = self.flush(epoch_acc, state=state, global_step=global_step, recipe=recipe)
        return state, epoch_acc

    def epoch_logs(self, epoch: int, epoch_acc: dict, global_step: int) -> dict:
        """The epoch's metrics and skipped steps; warns when every step of it was skipped (not when the epoch was
        one interval, already named)."""
        logs = {**metrics_lib.results(self.program.metrics, epoch_acc), "skipped_steps": self.epoch_skipped}
        if (self.epoch_first, global_step) != self.warned:
            nonfinite.warn_all_skipped(f"Epoch {epoch + 1}", self.epoch_skipped, self.epoch_first, global_step)
        return logs


def log_values(state: dict) -> tuple:
    """What each log reads off the state (traced once, into the compiled read): metric sums, the non-finite step
    counts, the learning rates."""
    return state["acc"], optim.nonfinite_counts(state["opt"]), optim.current_lrs(state["opt"])
