"""Filling a module's state from checkpoint tensors: eval_shape -> fill one tensor at a time -> init what is new.

The module is never randomly initialised as a whole: it is traced abstractly, each checkpoint tensor is matched
against the architecture's table (`finetune.hf.tables`), transformed, shape-checked, cast and put in place, and only
the parameters nothing filled (a new head) are initialised. Every coverage problem is reported in one `LoadError`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from finetune import sharding as sharding_lib
from finetune.errors import LoadError
from finetune.hf import tables
from finetune.hf.files import Checkpoint, open_checkpoint
from finetune.params.rules import path_str

logger = logging.getLogger("finetune")


def _init_leaves(
    init_fn: Callable[[], nnx.Module], paths: frozenset[str], shardings: Mapping[str, Any] | None = None
) -> dict[str, jax.Array]:
    """Initialises only ``paths``: the jitted init returns just those leaves, so XLA drops the rest of the model.
    With ``shardings`` (``{path: sharding}``), each leaf is created directly in its sharding."""

    def init():
        flat = nnx.to_flat_state(nnx.state(init_fn()))
        return {path_str(p): v.get_value() for p, v in flat if path_str(p) in paths}

    if shardings:
        return jax.jit(init, out_shardings={p: shardings[p] for p in paths})()
    return jax.jit(init)()


class _Fill:
    """Puts checkpoint tensors into abstract variables and collects every coverage problem on the way."""

    def __init__(self, variables: dict[str, nnx.Variable], fresh: str | None, shardings=None):
        self.variables, self.shardings = variables, shardings
        self.fresh = re.compile(fresh) if fresh else None
        self.filled: set[str] = set()
        self.wrong: set[str] = set()  # paths whose tensor had another shape: reported once, as a mismatch
        self.unused: list[str] = []
        self.mismatched: list[str] = []
        self.replaced: list[str] = []
        self.non_finite: list[str] = []  # checkpoint keys holding NaN or inf (after the cast to the parameter dtype)

    def is_fresh(self, path: str) -> bool:
        return bool(self.fresh and self.fresh.fullmatch(path))

    def run(self, readers: Mapping[str, Callable[[], np.ndarray]], table, ignore: Sequence[str]) -> None:
        for key, read in readers.items():
            found = tables.match(table, key)
            if found is None or any(p not in self.variables or p in self.filled for p in found[1]):
                if not tables.ignored(ignore, key):
                    self.unused.append(key if found is None else f"{key} (maps to {', '.join(found[1])})")
                continue
            row, paths = found
            raw = read()
            for path, array in zip(paths, row.transform.forward(raw), strict=True):
                self.put(key, raw.shape, path, array)
            del raw  # one checkpoint tensor alive at a time

    def put(self, key: str, raw_shape: tuple[int, ...], path: str, array: np.ndarray) -> None:
        want = self.variables[path].get_value()
        if tuple(array.shape) != tuple(want.shape):
            after = "" if array.shape == raw_shape else f" ({array.shape} after the table's transform)"
            problem = (
                f"checkpoint key `{key}` has shape {raw_shape}{after}, but the model's `{path}` has shape {want.shape}"
            )
            (self.replaced if self.is_fresh(path) else self.mismatched).append(problem)
            self.wrong.add(path)
            return
        value = np.asarray(array, dtype=want.dtype)
        if jnp.issubdtype(value.dtype, jnp.inexact) and not np.isfinite(value).all():
            self.non_finite.append(f"{key} ({np.count_nonzero(~np.isfinite(value)):,} of {value.size:,} values)")
        if self.shardings:  # straight into its sharding: only this device's shard of it is copied to each device
            self.variables[path].set_value(sharding_lib.put(value, self.shardings[path]))
        else:
            self.variables[path].set_value(jax.device_put(value))
        self.filled.add(path)

    def check(self, where: str) -> tuple[str, ...]:
        """Raises one `LoadError` listing every problem; else returns the parameter paths to initialise fresh."""
        params = {p for p, v in self.variables.items() if isinstance(v, nnx.Param)}
        new = sorted(p for p in params - self.filled if self.is_fresh(p))
        missing = sorted(params - self.filled - self.wrong - set(new))
        sections = [
            ("Checkpoint keys that no table row used", self.unused),
            ("Shape mismatches", self.mismatched),
            ("Model parameters that nothing in the checkpoint filled", missing),
        ]
        if any(items for _, items in sections):
            raise LoadError(
                f"The checkpoint {where} does not fit the model:\n"
                + "\n".join(tables.listing(title, items) for title, items in sections if items)
                + "\nCheck that the checkpoint's config matches its weights, and pick the task whose head it has (or "
                "one without a head, e.g. feature-extraction)."
            )
        for problem in self.replaced:
            logger.warning("Re-initialising a head parameter: %s.", problem)
        if self.non_finite:
            logger.warning(
                "The checkpoint %s has non-finite values (NaN or inf) in %s. Predictions and gradients through them "
                "will be NaN: use an intact copy of the checkpoint, or reinitialise those tensors.",
                where,
                ", ".join(self.non_finite),
            )
        return tuple(new)


def load_weights(
    init_fn: Callable[[], nnx.Module],
    table: Sequence[tables.Row | tuple],
    checkpoint: Checkpoint,
    *,
    ignore: Sequence[str] = (),
    fresh: str | None = None,
    layout: Any = None,
) -> tuple[nnx.Module, tuple[str, ...]]:
    """Builds the module from a checkpoint without ever allocating its random initialisation.

    ``init_fn`` is traced abstractly (`nnx.eval_shape`). Each checkpoint tensor is read on its own, matched against
    the table (first row whose key template stands for it), transformed, shape-checked against the abstract
    parameter, cast to its dtype and put in the state. Then coverage is checked both ways and every problem is raised
    at once.

    Args:
      init_fn: Builds the module (with its ``rngs``); called abstractly, and under `jax.jit` for what is new.
      table: The checkpoint key <-> NNX path rows (`finetune.hf.tables`).
      checkpoint: The files to read, from `finetune.hf.files.find_checkpoint`.
      ignore: Key templates of checkpoint keys that may go unused (e.g. ``cls.*``, a pretraining head).
      fresh: Full-match regex of parameter paths that may be absent from the checkpoint, or stored with another
        shape (a classifier with a different number of labels). Those are initialised fresh.
      layout: A `finetune.sharding.Layout`: each tensor goes straight into its sharding as it is read (no full copy
        on one device first). None: the default device.

    Returns:
      ``(module, new_paths)``: the module with all its variables set, and the paths initialised fresh.

    Raises:
      LoadError: Listing every checkpoint key no row used, every shape mismatch and every parameter nothing filled.

    Example:
      >>> module, new = load_weights(lambda: Bert(cfg, rngs=build_rngs(0)), table, find_checkpoint("./bert"))
    """
    graphdef, state = nnx.split(nnx.eval_shape(init_fn))
    variables = {path_str(p): v for p, v in nnx.to_flat_state(state)}
    shardings = layout.variable_shardings(variables) if layout is not None else None
    fill = _Fill(variables, fresh, shardings)
    with open_checkpoint(checkpoint) as readers:
        fill.run(readers, tables.rows(table), ignore)
    new = fill.check(str(checkpoint.files[0].parent))
    to_init = frozenset(variables) - fill.filled
    if to_init:
        for path, value in _init_leaves(init_fn, to_init, shardings).items():
            variables[path].set_value(value)
    logger.info("Loaded %d tensors (%s); initialised fresh: %s", len(fill.filled), checkpoint.format, new or "none")
    return nnx.merge(graphdef, state), new
