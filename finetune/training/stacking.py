"""Steps per call: stacking several batches of one shape into one call of the compiled program
(`finetune.Recipe.steps_per_execution`), and the ``'auto'`` choice of how many."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np

# steps_per_execution='auto' stacks steps when one takes less than this, up to this many per call.
AUTO_CHUNK_BELOW_S = 0.005
AUTO_CHUNK_MAX = 64


class Stacking:
    """How many steps one call runs (``chunk``), decided once for ``'auto'`` from the second log interval's timing
    (the first holds the compilation)."""

    def __init__(self, recipe: Any, *, sharded: bool):
        spe, self.sharded = recipe.steps_per_execution, sharded
        self.chunk = min(spe, recipe.log_every) if spe != "auto" and spe > 1 else 1  # a call never spans a log
        self._logs = 0  # log intervals reported so far

    def logged(self, seconds_per_step: float, recipe: Any) -> None:
        """After each log report: on the second, ``'auto'`` stacks when a step is so short that the per-call cost
        matters."""
        self._logs += 1
        if self._logs == 2 and recipe.steps_per_execution == "auto" and not self.sharded:
            if seconds_per_step < AUTO_CHUNK_BELOW_S:
                self.chunk = min(recipe.log_every, AUTO_CHUNK_MAX)

    def units(
        self, stream: Iterator, *, step: int, done: int, total: int, log_every: int, save_every: int | None
    ) -> Iterator[tuple[int, int, dict]]:
        """``(index of the last batch, steps, batch)``: single batches, or `chunk` of one shape stacked.

        A stack never crosses a log interval, a save or the end of training, so everything the loop does between
        steps (logs, callbacks, checkpoints, stopping) happens at the same steps as without stacking.
        """
        for index, batch in stream:
            room = min(total - done, log_every - done % log_every)
            if save_every:
                room = min(room, save_every - step % save_every)
            group = [(index, batch)]
            if self.chunk > 1 and room >= self.chunk:
                group.extend(itertools.islice(stream, self.chunk - 1))
                shapes = {tuple((k, v.shape, v.dtype) for k, v in sorted(b.items())) for _, b in group}
                if len(group) == self.chunk and len(shapes) == 1:
                    yield group[-1][0], len(group), {k: np.stack([b[k] for _, b in group]) for k in batch}
                    done, step = done + len(group), step + len(group)
                    continue
            for i, b in group:  # one at a time (a shape change inside the stack, or the data ran out)
                yield i, 1, b
                done, step = done + 1, step + 1
