"""Ctrl-C and preemption: while training with checkpoints, SIGINT / SIGTERM finish the current step, write a
checkpoint, and only then stop (KeyboardInterrupt for SIGINT; for SIGTERM the process exits with 143, as it would
have without the handler)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator


class Interrupts:
    """Records the first SIGINT / SIGTERM received while installed; ``raise_now()`` re-raises it the usual way."""

    def __init__(self):
        self.signum: int | None = None

    def _handle(self, signum, frame):
        del frame
        if self.signum is None:
            self.signum = signum

    def raise_now(self) -> None:
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt("Training interrupted (SIGINT); a checkpoint was written before stopping.")
        # SIGTERM: the checkpoint is written and waited for; exit now, as the default handler would have, rather than
        # unwind through background threads (data prefetch, checkpoint writers) at interpreter shutdown.
        assert self.signum is not None  # SIGTERM was received
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + int(self.signum))


@contextlib.contextmanager
def deferred(enabled: bool) -> Iterator[Interrupts]:
    """Installs the handlers (main thread only, when ``enabled``), restoring the previous ones on exit."""
    interrupts = Interrupts()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield interrupts
        return
    previous = {s: signal.signal(s, interrupts._handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield interrupts
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
