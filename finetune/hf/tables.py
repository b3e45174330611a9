"""One loader for every architecture: checkpoint key <-> NNX path tables, applied both ways.

A table is data: a sequence of `Row`s. ``Row.key`` is an escaped full-match regex on the checkpoint key, ``Row.path``
an NNX path template (``\\1`` back-references to the key's groups) or a tuple of them when one checkpoint tensor
feeds several parameters (a fused qkv split), and ``Row.transform`` turns the checkpoint array into the parameter
array(s) and back.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from finetune import sharding as sharding_lib
from finetune.errors import LoadError

# The reading half lives in weight_files; re-exported (see __all__) since callers import it from here.
from finetune.hf.files import (
    FLAX_MSGPACK,
    PICKLE,
    SAFETENSORS,
    SAFETENSORS_INDEX,
    Checkpoint,
    find_checkpoint,
    open_checkpoint,
    pickle_refused,
    read_json,
)

logger = logging.getLogger("finetune")

__all__ = [
    "Checkpoint",
    "FLAX_MSGPACK",
    "IDENTITY",
    "PICKLE",
    "Reshape",
    "Row",
    "SAFETENSORS",
    "SAFETENSORS_INDEX",
    "Split",
    "TRANSPOSE",
    "Transform",
    "Transpose",
    "build_rngs",
    "export_weights",
    "find_checkpoint",
    "load_weights",
    "open_checkpoint",
    "path_str",
    "pickle_refused",
    "read_json",
    "render_key",
]


@dataclasses.dataclass(frozen=True)
class Transform:
    """Checkpoint array <-> parameter array(s). The base class is the identity."""

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """Checkpoint array -> one array per target path."""
        return (x,)

    def inverse(self, xs: Sequence[np.ndarray]) -> np.ndarray:
        """Parameter arrays (one per target path) -> checkpoint array."""
        (x,) = xs
        return x


@dataclasses.dataclass(frozen=True)
class Transpose(Transform):
    """A PyTorch ``nn.Linear`` weight ``(out, in)`` <-> an NNX kernel ``(in, out)``; any permutation via ``axes``."""

    axes: tuple[int, ...] | None = None

    def forward(self, x):
        return (np.transpose(x, self.axes),)

    def inverse(self, xs):
        (x,) = xs
        return np.transpose(x, None if self.axes is None else np.argsort(self.axes))


@dataclasses.dataclass(frozen=True)
class Reshape(Transform):
    """Transpose (optional) then reshape, e.g. a ``(heads*dim, embed)`` weight -> an ``(embed, heads, dim)`` kernel.

    ``shape`` is the parameter shape; ``source`` the checkpoint shape after the transpose (for `inverse`).
    """

    shape: tuple[int, ...]
    source: tuple[int, ...]
    transpose: tuple[int, ...] | None = None

    def forward(self, x):
        if self.transpose is not None:
            x = np.transpose(x, self.transpose)
        return (np.reshape(x, self.shape),)

    def inverse(self, xs):
        (x,) = xs
        x = np.reshape(x, self.source)
        return x if self.transpose is None else np.transpose(x, np.argsort(self.transpose))


@dataclasses.dataclass(frozen=True)
class Split(Transform):
    """One fused checkpoint tensor (e.g. GPT-2's ``c_attn``) <-> ``n`` equal parameters along ``axis``."""

    n: int
    axis: int = -1
    transpose: bool = False

    def forward(self, x):
        if self.transpose:
            x = x.T
        return tuple(np.split(x, self.n, axis=self.axis))

    def inverse(self, xs):
        x = np.concatenate(list(xs), axis=self.axis)
        return x.T if self.transpose else x


IDENTITY = Transform()
TRANSPOSE = Transpose()


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of a mapping table: checkpoint key regex -> NNX path template(s), with a transform."""

    key: str
    path: str | tuple[str, ...]
    transform: Transform = IDENTITY

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path,) if isinstance(self.path, str) else self.path


# --------------------------------------------------------------------------------------------------------------------
# Loading: eval_shape -> fill one tensor at a time -> init only what is new -> merge
# --------------------------------------------------------------------------------------------------------------------


def path_str(path: Sequence[Any]) -> str:
    """An NNX path tuple as the "/"-joined string that tables and rules match, e.g. ``encoder/layers/3/...``."""
    return "/".join(str(part) for part in path)


def _listing(title: str, items: Sequence[str], limit: int = 25) -> str:
    shown = [f"  - {item}" for item in items[:limit]]
    if len(items) > limit:
        shown.append(f"  - ... and {len(items) - limit} more")
    return f"{title} ({len(items)}):\n" + "\n".join(shown)


def _match_row(key: str, rows: Sequence[tuple[re.Pattern, Row]]) -> tuple[Row, tuple[str, ...]] | None:
    for pattern, row in rows:
        m = pattern.fullmatch(key)
        if m:
            return row, tuple(m.expand(template) for template in row.paths)
    return None


def build_rngs(seed: int) -> nnx.Rngs:
    """``nnx.Rngs(seed)`` for building modules under tracing (`load_weights`), with the same random numbers.

    Its counters are numpy scalars: flax bumps a traced counter through a path that asks the tracer for its
    ``sharding``, and jax answers by walking the whole trace, so tracing a model's init grows quadratically with its
    size (24 BERT layers: 6 s instead of 0.8 s). Each read of a counter is a copy: flax increments it in place, and
    jax keeps a numpy argument of a traced call (the count in ``fold_in(key, count)``) by reference, so without the
    copy every key drawn under tracing would see the final count, and every module built from these streams (each
    `Dropout`'s stream, each fresh parameter's initialiser) would get one and the same key.
    """
    rngs = nnx.Rngs(seed)
    for stream in vars(rngs).values():
        if isinstance(stream, nnx.RngStream):
            stream.count.set_value(np.zeros(stream.count.shape, np.uint32))
            stream.count.set_metadata(on_get_value=_copied)
    return rngs


def _copied(variable: nnx.Variable, value: np.ndarray) -> np.ndarray:
    return np.array(value)


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

    def __init__(self, variables: dict[str, nnx.Variable], fresh: re.Pattern | None, shardings=None):
        self.variables, self.fresh, self.shardings = variables, fresh, shardings
        self.filled: set[str] = set()
        self.wrong: set[str] = set()  # paths whose tensor had another shape: reported once, as a mismatch
        self.unused: list[str] = []
        self.mismatched: list[str] = []
        self.replaced: list[str] = []
        self.non_finite: list[str] = []  # checkpoint keys holding NaN or inf (after the cast to the parameter dtype)

    def run(self, readers: Mapping[str, Callable[[], np.ndarray]], rows, ignored: Sequence[re.Pattern]) -> None:
        for key, read in readers.items():
            match = _match_row(key, rows)
            if match is None or any(p not in self.variables or p in self.filled for p in match[1]):
                if not any(p.fullmatch(key) for p in ignored):
                    self.unused.append(key if match is None else f"{key} (maps to {', '.join(match[1])})")
                continue
            row, paths = match
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
            (self.replaced if self.fresh and self.fresh.fullmatch(path) else self.mismatched).append(problem)
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
        new = sorted(p for p in params - self.filled if self.fresh and self.fresh.fullmatch(p))
        missing = sorted(params - self.filled - self.wrong - set(new))
        sections = [
            ("Checkpoint keys that no table row used", self.unused),
            ("Shape mismatches", self.mismatched),
            ("Model parameters that nothing in the checkpoint filled", missing),
        ]
        if any(items for _, items in sections):
            raise LoadError(
                f"The checkpoint {where} does not fit the model:\n"
                + "\n".join(_listing(title, items) for title, items in sections if items)
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
    table: Sequence[Row],
    checkpoint: Checkpoint,
    *,
    ignore: Sequence[str] = (),
    fresh: str | None = None,
    layout: Any = None,
) -> tuple[nnx.Module, tuple[str, ...]]:
    """Builds the module from a checkpoint without ever allocating its random initialisation.

    ``init_fn`` is traced abstractly (`nnx.eval_shape`). Each checkpoint tensor is read on its own, matched against
    the table (``re.fullmatch``, first row wins), transformed, shape-checked against the abstract parameter, cast to
    its dtype and put in the state. Then coverage is checked both ways and every problem is raised at once.

    Args:
      init_fn: Builds the module (with its ``rngs``); called abstractly, and under `jax.jit` for what is new.
      table: The checkpoint key <-> NNX path rows.
      checkpoint: The files to read, from `find_checkpoint`.
      ignore: Full-match regexes of checkpoint keys that may go unused (e.g. a pretraining head).
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
    fill = _Fill(variables, re.compile(fresh) if fresh else None, shardings)
    with open_checkpoint(checkpoint) as readers:
        fill.run(readers, [(re.compile(row.key), row) for row in table], [re.compile(p) for p in ignore])
    new = fill.check(str(checkpoint.files[0].parent))
    to_init = frozenset(variables) - fill.filled
    if to_init:
        for path, value in _init_leaves(init_fn, to_init, shardings).items():
            variables[path].set_value(value)
    logger.info("Loaded %d tensors (%s); initialised fresh: %s", len(fill.filled), checkpoint.format, new or "none")
    return nnx.merge(graphdef, state), new


# --------------------------------------------------------------------------------------------------------------------
# Export: the inverse table
# --------------------------------------------------------------------------------------------------------------------

_KEY_META = frozenset(".^$*+?{}[]")


def _template_regex(template: str) -> re.Pattern:
    """``encoder/layers/\\1/x`` -> a regex whose named groups ``g1, g2, ...`` capture the back-referenced parts."""
    parts, seen, out = re.split(r"\\(\d+)", template), set(), []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            out.append(re.escape(part))
        else:
            out.append(f"(?P=g{part})" if part in seen else f"(?P<g{part}>[^/]+)")
            seen.add(part)
    return re.compile("".join(out))


def _fill_template(template: str, groups: Mapping[int, str]) -> str:
    return re.sub(r"\\(\d+)", lambda m: groups[int(m.group(1))], template)


def _skip_group(pattern: str, i: int, numbers: Iterator[int]) -> int:
    """From just inside a capturing group, returns the index of its closing parenthesis (numbering nested groups)."""
    depth = 1
    while True:
        c = pattern[i]
        if c == "\\":
            i += 1
        elif c == "[":
            i = pattern.index("]", i + 2 if pattern[i + 1] == "]" else i + 1)
        elif c == "(":
            depth += 1
            if not pattern.startswith("(?", i) or pattern.startswith("(?P<", i):
                next(numbers)
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1


def render_key(pattern: str, groups: Mapping[int, str]) -> str:
    """The checkpoint key a table regex stands for, given its capture groups (the inverse of matching).

    Supported: escaped literals, capturing groups (replaced by ``groups``), ``(?:a|b)`` (renders ``a``) and optional
    groups: greedy ``(?:x)?`` renders ``x``, lazy ``(?:x)??`` renders nothing. Both match the same keys, so a table
    picks the form it exports with the quantifier, e.g. ``(?:bert\\.)?`` for task models, ``(?:bert\\.)??`` for the
    bare encoder.
    """
    numbers = itertools.count(1)

    def unrenderable() -> LoadError:
        return LoadError(f"The table key {pattern!r} cannot be turned back into a checkpoint key for export.")

    def alternatives(i: int) -> tuple[str, int]:
        alts, current = [], []
        while i < len(pattern) and pattern[i] != ")":
            c = pattern[i]
            if c == "\\":
                if pattern[i + 1].isalnum():
                    raise unrenderable()
                current.append(pattern[i + 1])
                i += 2
                continue
            if c == "|":
                alts.append("".join(current))
                current = []
            elif c == "(":
                if pattern.startswith("(?:", i):
                    text, i = alternatives(i + 3)
                else:
                    number = next(numbers)
                    i = _skip_group(pattern, i + 1, numbers)
                    if number not in groups:
                        raise unrenderable()
                    text = groups[number]
                if pattern.startswith("??", i + 1):
                    text, i = "", i + 2
                elif pattern.startswith("?", i + 1):
                    i += 1
                current.append(text)
            elif c in _KEY_META:
                raise unrenderable()
            else:
                current.append(c)
            i += 1
        alts.append("".join(current))
        return alts[0], i

    return alternatives(0)[0]


def export_weights(module: nnx.Module, table: Sequence[Row]) -> dict[str, np.ndarray]:
    """The module's parameters as checkpoint tensors: the table run backwards (first row wins for each path).

    A row with several paths (a fused tensor) is exported when all its paths exist, via ``Transform.inverse``.
    Tied parameters are exported once, under the first row's key.

    Args:
      module: A module built by an architecture whose table this is.
      table: The same rows used by `load_weights`.

    Returns:
      ``{checkpoint key: numpy array}`` (contiguous, in the parameters' dtype), ready for
      ``safetensors.numpy.save_file``.

    Raises:
      LoadError: If some parameter is not covered by any row.

    Example:
      >>> safetensors.numpy.save_file(export_weights(model.module, table), "model.safetensors")
    """
    params = {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    out: dict[str, np.ndarray] = {}
    done: set[str] = set()
    for row in table:
        first = _template_regex(row.paths[0])
        for path in params:
            m = first.fullmatch(path)
            if m is None or path in done:
                continue
            groups = {int(name[1:]): value for name, value in m.groupdict().items()}
            paths = [_fill_template(t, groups) for t in row.paths]
            if any(p not in params or p in done for p in paths):
                continue
            key = render_key(row.key, groups)
            out[key] = np.ascontiguousarray(row.transform.inverse([np.asarray(params[p].get_value()) for p in paths]))
            done.update(paths)
    missing = sorted(set(params) - done)
    if missing:
        raise LoadError(
            "These parameters have no row in the checkpoint table, so they cannot be exported:\n"
            + _listing("Uncovered parameters", missing)
            + "\nAdd rows for them to the architecture's table."
        )
    return out
