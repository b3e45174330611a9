"""JAX's persistent compilation cache, on by default in the user's cache directory.

A second run of the same recipe then starts without recompiling its train step. Opt out with
``FINETUNE_COMPILATION_CACHE=0``, or point it elsewhere with ``FINETUNE_COMPILATION_CACHE=/path``; a cache directory
the user configured for JAX themselves is left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "finetune" / "xla"


def enable() -> str | None:
    """Turns the cache on unless opted out or already configured; returns the directory in use (None: off)."""
    setting = os.environ.get("FINETUNE_COMPILATION_CACHE", "1")
    if setting in ("0", "false", "off", ""):
        return None
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    directory = cache_dir() if setting in ("1", "true", "on") else Path(setting)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home: run without the cache rather than fail
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return str(directory)
