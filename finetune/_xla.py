"""XLA defaults of finetune, set at import while JAX's backends are not yet initialised.

On CPU, XLA's default "concurrency optimized" scheduler orders a train step for parallelism at the cost of memory.
The plain scheduler made the all-MiniLM-L6-v2 train step (batch 32, sequence 128) need 1,264 MB of scratch memory
instead of 1,525 MB, and was not slower (2.80 against 2.95 s/step on 2 cores): see the README's "Performance"
section. The option is read only from ``XLA_FLAGS`` (per-function compiler options do not reach the scheduler), so
it is appended there; flags the user set win.

Also on CPU (no accelerator plugin installed, or ``JAX_PLATFORMS=cpu``), where the C library is glibc, the scratch
memory of each step is kept for the next one instead of being handed back to the OS and faulted in again
(`keep_scratch_memory`). Opt out of both with ``FINETUNE_XLA_DEFAULTS=0``.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

CPU_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def configure() -> list[str]:
    """Appends `CPU_FLAGS` the user did not set to ``XLA_FLAGS``; returns the flags added (none once JAX runs)."""
    if os.environ.get("FINETUNE_XLA_DEFAULTS", "1").lower() in ("0", "false", "off", ""):
        return []
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        log.debug("JAX already runs, so finetune's XLA defaults are not applied: %s", " ".join(CPU_FLAGS))
        return []
    if _cpu_only():
        keep_scratch_memory()
    current = os.environ.get("XLA_FLAGS", "")
    added = [flag for flag in CPU_FLAGS if flag.split("=")[0] not in current]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_KEEP_UP_TO = 2**31 - 1  # bytes of free memory glibc may keep at the top of its heap (mallopt takes an int)


def keep_scratch_memory() -> bool:
    """Lets the C allocator keep a step's scratch memory for the next step, instead of returning it to the OS.

    XLA:CPU allocates each execution's scratch (all its temporaries in one block: 394 MB for MiniLM's train step at
    batch 32 x 64 tokens) with ``malloc`` on its worker threads and frees it at the end. glibc serves such a block
    with a fresh ``mmap`` and returns it with ``munmap``: threads other than the main one allocate from arenas of at
    most 64 MB, and blocks above the mmap threshold (at most 32 MB) bypass the heap. So every step faulted the whole
    block in again, page by page: 113k page faults and about 0.2 s of kernel time per step at 32 x 64 tokens. This
    asks glibc (``mallopt``) for one arena for all threads, blocks from the heap instead of ``mmap``, and to keep up
    to 2 GB free at the heap's top: the next step reuses the same pages, with no faults. Measured in one process,
    alternating steps with the block kept and returned: 661 against 744 ms at 32 x 40 tokens, 419 against 476 ms at
    32 x 24 (README, "Performance"). Memory the compiler frees is still handed back (`release_freed_memory`).

    Takes effect for threads that have not allocated yet, so it runs at import, before JAX starts its threads.
    Returns False (doing nothing) where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return all(
        mallopt(option, value) == 1
        for option, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_UP_TO))
    )


def _cpu_only() -> bool:
    """Whether JAX will run on the CPU: ``JAX_PLATFORMS`` says only ``cpu``, or no accelerator plugin is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms == "cpu"
    from importlib import metadata

    accelerators = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu", "jax-tpu", "jax-metal", "jax_metal")
    return not any((d.metadata["Name"] or "").lower().startswith(accelerators) for d in metadata.distributions())


_malloc_trim = None


def release_freed_memory() -> bool:
    """Hands the memory the C allocator holds but no longer uses back to the OS (glibc's ``malloc_trim``).

    Compiling a program, XLA's compiler allocates and then frees hundreds of MB in small blocks, which glibc keeps
    in its arenas: they stay in the process's resident memory and add to its peak once the steps allocate their
    scratch. The trainer calls this after each call that compiled a new program. Measured on MiniLM's train step at
    batch 32 x 16 tokens: 156 MB handed back after the compile, and the process's peak resident memory over the
    first steps went from 1,303 to 1,145 MB. Returns False (doing nothing) where the C library is not glibc.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if not _malloc_trim:
        return False
    _malloc_trim(0)
    return True
