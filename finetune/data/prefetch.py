"""Batches to device ahead of the step that needs them: asynchronously dispatched transfers, or a background thread
where steps run on the calling thread."""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

Batch = dict[str, np.ndarray]


def prefetch(batches: Iterator[Batch], *, size: int = 2, sharding: Any = None) -> Iterator[dict[str, jax.Array]]:
    """Moves batches to device ``size`` ahead of the consumer.

    Transfers and steps are dispatched asynchronously, so while the device runs step ``n`` the host already pads
    batch ``n + 1`` and starts its transfer; this needs no background thread (which would contend with the steps'
    dispatch for the interpreter lock, and costs more than the small models' steps themselves).

    Args:
      batches: Host batches.
      size: How many device batches may be in flight ahead of the consumer.
      sharding: Where to put them (default: the default device).

    Returns:
      An iterator of device batches, in order.

    Example:
      >>> for batch in prefetch(source.batches(32, seed=0)):
      ...     state = train_step(state, batch)
    """
    ahead: collections.deque = collections.deque()
    put = (lambda b: jax.device_put(b, sharding)) if sharding is not None else jax.device_put
    for batch in batches:
        ahead.append(put(batch))
        if len(ahead) > size:
            yield ahead.popleft()
    while ahead:
        yield ahead.popleft()


def prefetch_on_thread(batches: Iterator[Batch], *, size: int = 2, put: Any = None) -> Iterator[Batch]:
    """``batches`` made ``size`` ahead of the consumer on a background thread, each passed through ``put`` there.

    For synchronous dispatch (JAX on CPU as finetune sets it up: `finetune.runtime`), where a step call returns only
    once the step is done, so the host work of the next batch (gathering, padding, packing, images) would otherwise
    wait for it; the thread does that work while the step runs, as asynchronous dispatch did. An error in the
    thread is raised here, in order; closing the iterator stops the thread.

    Example:
      >>> for batch in prefetch_on_thread(source.batches(32, seed=0)):
      ...     state = train_step(state, batch)
    """
    ahead: queue.Queue = queue.Queue(maxsize=size)
    stop, end = threading.Event(), object()

    def offer(item: Any) -> bool:
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for batch in batches:
                if not offer(put(batch) if put is not None else batch):
                    return
            offer(end)
        except BaseException as error:  # handed to the consumer, which raises it
            offer(_Failed(error))

    thread = threading.Thread(target=work, name="finetune-batches", daemon=True)
    thread.start()
    try:
        while (item := ahead.get()) is not end:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()


class _Failed:
    """An error raised while making batches on `prefetch_on_thread`'s thread."""

    def __init__(self, error: BaseException):
        self.error = error
