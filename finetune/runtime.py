"""The CPU tuning of finetune's loops, as one explicit call: `tune()`. Importing finetune changes nothing.

`tune()`, called before JAX starts (before the first array or device query), sets for the whole process:
- XLA's plain scheduler on CPU (``--xla_cpu_enable_concurrency_optimized_scheduler=false`` appended to
  ``XLA_FLAGS``): the default one orders a train step for parallelism at the cost of memory.
- JAX's asynchronous dispatch on CPU off, so that a compiled program runs, and allocates, on the calling thread;
  fit() then makes the next batch on a background thread meanwhile.
- the C allocator (glibc) keeping a step's scratch memory from one call to the next inside fit, evaluate and
  predict (`kept_scratch`), instead of unmapping and faulting it in again at each step.
- JAX's persistent compilation cache, in ``~/.cache/finetune/xla``: a second run starts without recompiling.

The CLI calls it for its commands. What each part does, measured: docs/performance.md ("CPU tuning").
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

CPU_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


@dataclasses.dataclass(frozen=True)
class Tuning:
    """What `tune()` set: the flags it appended to ``XLA_FLAGS``, whether asynchronous dispatch on CPU is off,
    whether finetune's loops keep their scratch memory, and the compilation cache's directory (None: off)."""

    xla_flags: tuple[str, ...] = ()
    dispatch_off: bool = False
    keep_scratch: bool = False
    compile_cache: str | None = None


_tuning = Tuning()


def tune(
    *,
    scheduler: bool = True,
    dispatch: bool = True,
    allocator: bool = True,
    compile_cache: bool | str | os.PathLike = True,
) -> Tuning:
    """Tunes this process for finetune on CPU (see the module docstring); each argument False leaves that part as
    it is. ``compile_cache``: True for ``~/.cache/finetune/xla``, or a directory. The XLA flag and the dispatch
    setting take effect only before JAX starts: called later, they are left alone (logged); a compilation cache
    directory you configured for JAX yourself, or ``JAX_CPU_ENABLE_ASYNC_DISPATCH`` set in the environment, wins.
    Returns what is now in force (`Tuning`). Call it once, first thing:

        >>> import finetune as ft
        >>> ft.tune()  # doctest: +SKIP
    """
    import jax
    from jax._src import xla_bridge

    global _tuning
    started = xla_bridge.backends_are_initialized()
    if started and (scheduler or dispatch):
        log.info("JAX already runs: finetune leaves XLA_FLAGS and asynchronous dispatch as they are")
    flags: tuple[str, ...] = ()
    if scheduler and not started:
        current = os.environ.get("XLA_FLAGS", "")
        flags = tuple(flag for flag in CPU_FLAGS if flag.split("=")[0] not in current)
        if flags:
            os.environ["XLA_FLAGS"] = " ".join([current, *flags]).strip()
    if dispatch and not started and "JAX_CPU_ENABLE_ASYNC_DISPATCH" not in os.environ:
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    cache = _enable_cache(compile_cache) if compile_cache else None
    _tuning = Tuning(
        xla_flags=_tuning.xla_flags + flags,
        dispatch_off=not jax.config.read("jax_cpu_enable_async_dispatch"),
        keep_scratch=allocator or _tuning.keep_scratch,
        compile_cache=cache or _tuning.compile_cache,
    )
    return _tuning


def tune_from_environment() -> Tuning:
    """`tune()` as the CLI applies it: ``FINETUNE_XLA_DEFAULTS=0`` leaves the scheduler, the dispatch and the
    allocator alone; ``FINETUNE_COMPILATION_CACHE=0`` turns the cache off, or names its directory."""
    off = ("0", "false", "off", "")
    defaults = os.environ.get("FINETUNE_XLA_DEFAULTS", "1").lower() not in off
    cache = os.environ.get("FINETUNE_COMPILATION_CACHE", "1")
    where: bool | str = False if cache.lower() in off else True if cache.lower() in ("1", "true", "on") else cache
    return tune(scheduler=defaults, dispatch=defaults, allocator=defaults, compile_cache=where)


def tuning() -> Tuning:
    """What `tune()` has set in this process so far (nothing: `Tuning()`)."""
    return _tuning


def cache_dir() -> Path:
    """finetune's default compilation cache directory: ``$XDG_CACHE_HOME/finetune/xla`` (``~/.cache`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "finetune" / "xla"


def _enable_cache(where: bool | str | os.PathLike) -> str | None:
    """Turns JAX's persistent compilation cache on unless one is configured; returns the directory (None: off)."""
    import jax

    configured: str | None = getattr(jax.config, "jax_compilation_cache_dir")  # noqa: B009 (typed as a flag)
    if configured:
        return configured
    directory = cache_dir() if where is True or where is False else Path(where)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        log.warning("the compilation cache directory %s cannot be made: running without the cache", directory)
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return str(directory)


_libc = None


def _glibc():
    """The C library where it is glibc (``mallopt`` and ``malloc_trim``), else None."""
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(None)
            for name in ("gnu_get_libc_version", "mallopt", "malloc_trim"):  # glibc has all three
                getattr(lib, name)
            _libc = lib
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def runs_inline() -> bool:
    """Whether compiled programs run on the thread that calls them: JAX on CPU with asynchronous dispatch off."""
    import jax

    return jax.default_backend() == "cpu" and not jax.config.read("jax_cpu_enable_async_dispatch")


# glibc's mallopt parameters and their defaults
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_KEEP_UP_TO = 2**31 - 1  # the most free memory kept at the heap's top (mallopt takes an int): 2 GB
_lock = threading.Lock()
_loops = 0  # kept_scratch blocks running
_depth = 0  # of which keep their scratch
_keeping = False  # whether the settings that keep scratch are on
_kept_top: int | None = None  # free bytes at the heap's top after the first kept call of a run (see `keep`)
_faults = 0  # the process's minor page faults at the end of the last kept call
_FRESH_PAGES = 4096  # a call that faulted in more pages (16 MB) did not find its scratch kept


@contextlib.contextmanager
def kept_scratch() -> Iterator[bool]:
    """The block in which finetune's loops (fit, evaluate, predict) call compiled programs. Inside it, the compiler's
    freed memory goes back to the OS after each compile, before the new program first runs (`_after_compile`), and
    `keep` keeps the scratch memory of compiled programs in the C heap from one call to the next. Yields whether
    the latter applies: glibc, JAX on CPU with asynchronous dispatch off (programs then run, and allocate, on the
    calling thread: see the module's docstring), and `tune()` called with ``allocator`` (the default). Without it,
    nothing here applies.

    On the way out glibc's defaults come back and ``malloc_trim`` returns what is free, so the process holds no
    more memory after fit() than before. Re-entrant (evaluation inside fit).
    """
    global _depth, _loops
    if _glibc() is None or not _tuning.keep_scratch:
        yield False
        return
    _listen_for_compiles()
    applies = runs_inline()
    with _lock:
        _loops += 1
        _depth += applies
    try:
        yield applies
    finally:
        with _lock:
            _loops -= 1
            _depth -= applies
            last = applies and _depth == 0
        if last:  # read under the lock: another thread's block may start meanwhile
            keep(False)


def keep(on: bool) -> None:
    """Inside `kept_scratch`: the next program calls keep their freed scratch (``on``), or glibc's defaults.

    On: glibc serves big blocks from the heap instead of ``mmap`` (``M_MMAP_MAX=0``) and keeps up to 2 GB free at
    the heap's top (``M_TRIM_THRESHOLD``), so a step's freed scratch is there, its pages mapped, for the next step.
    Off (before a call that may compile, or of another shape): the defaults, and ``malloc_trim`` hands back what is
    free. Called on after a kept call, it trims every free block but the heap's top (where the freed scratch is),
    and everything after a call that faulted 16 MB or more in, so that two scratch blocks are never resident at
    once (docs/performance.md, "CPU tuning"). Outside `kept_scratch` this does nothing.
    """
    global _kept_top, _faults
    libc = _glibc()
    with _lock:
        if libc is None or (on and _depth == 0):
            return
        if on and _keeping:
            # After a kept call: only the heap's top stays, where the freed scratch is, and at most what the first
            # kept call left there; nothing when a later call did not find its scratch there (then start again). A
            # call that faulted nothing in added no resident memory: nothing to trim (tiny steps pay one getrusage).
            faults = _minor_faults()
            if _kept_top is None:
                _kept_top = _free_at_top(libc)
                libc.malloc_trim(ctypes.c_size_t(_kept_top))
            elif faults - _faults >= _FRESH_PAGES:
                _kept_top = None
                libc.malloc_trim(0)
            _faults = faults
            return
        if on != _keeping:
            _set(libc, on)


# JAX records this event on the calling thread when a program's compile (or its load from the compilation cache)
# ends, before the program first runs
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_listening = False


def _listen_for_compiles() -> None:
    """Registers `_after_compile` with ``jax.monitoring`` (once per process)."""
    global _listening
    with _lock:
        if _listening:
            return
        _listening = True
    import jax

    jax.monitoring.register_event_duration_secs_listener(_after_compile)


def _after_compile(event: str, duration_secs: float, **kwargs: str | int) -> None:
    """Inside `kept_scratch`: hands the compiler's freed memory back to the OS (`release_freed_memory`) once a
    program's compile (or its load from the cache) ends, before the program first runs: left in the heap, the
    compiler's freed blocks add to the peak once the first step faults its scratch in."""
    if event == _COMPILE_EVENT and _loops > 0:
        release_freed_memory()


def _set(libc, on: bool) -> None:
    """glibc's settings that keep scratch (``on``), or its defaults with what is free handed back."""
    global _keeping, _kept_top, _faults
    _keeping, _kept_top, _faults = on, None, _minor_faults()
    libc.mallopt(_M_MMAP_MAX, 0 if on else _DEFAULT_MMAP_MAX)
    libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_UP_TO if on else _DEFAULT_TRIM_THRESHOLD)
    if not on:
        libc.malloc_trim(0)


def _minor_faults() -> int:
    """The process's minor page faults so far (a page mapped in on first touch)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mallinfo(libc) -> _MallInfo2 | None:
    """glibc's ``mallinfo2`` (2.33 and later), or None."""
    fn = getattr(libc, "mallinfo2", None)
    if fn is None:
        return None
    fn.restype = _MallInfo2
    return fn()


def _free_at_top(libc) -> int:
    """Free bytes at the top of the main heap (what ``malloc_trim`` could give back there)."""
    info = _mallinfo(libc)
    return info.keepcost if info is not None else 0


def release_freed_memory() -> bool:
    """Hands the memory the C allocator holds but no longer uses back to the OS (glibc's ``malloc_trim``); called
    after each compile inside finetune's loops. Returns False (doing nothing) where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
