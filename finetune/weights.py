"""One loader for every architecture: checkpoint key <-> NNX path tables, applied both ways.

A table is data: a sequence of `Row`s. ``Row.key`` is an escaped full-match regex on the checkpoint key, ``Row.path``
an NNX path template (``\\1`` back-references to the key's groups) or a tuple of them when one checkpoint tensor
feeds several parameters (a fused qkv split), and ``Row.transform`` turns the checkpoint array into the parameter
array(s) and back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import os
import pathlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
from flax import nnx

from finetune import sharding as sharding_lib
from finetune.errors import LoadError

logger = logging.getLogger("finetune")


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
# Finding and reading checkpoint files
# --------------------------------------------------------------------------------------------------------------------

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
FLAX_MSGPACK = "flax_model.msgpack"
PICKLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# (file, format, whether it is an index of shards), in order of preference.
_LAYOUTS = (
    (SAFETENSORS, "safetensors", False),
    (SAFETENSORS_INDEX, "safetensors", True),
    (FLAX_MSGPACK, "msgpack", False),
    (PICKLE, "pickle", False),
    (PICKLE_INDEX, "pickle", True),
)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """The weight files of one checkpoint directory.

    Attributes:
      format: ``"safetensors"``, ``"msgpack"`` (Hugging Face Flax) or ``"pickle"`` (PyTorch ``.bin``).
      files: The files to read, shards in order.
    """

    format: str
    files: tuple[pathlib.Path, ...]


def pickle_refused(name: str) -> LoadError:
    """The error for a checkpoint that only has pickled PyTorch weights while ``allow_pickle`` is False."""
    return LoadError(
        f"`allow_pickle` is False, and the only weights in {name} are pickled PyTorch files (`{PICKLE}`). Unpickling "
        "can execute arbitrary code. Pass allow_pickle=True if you trust this checkpoint, or convert it to "
        "safetensors first (e.g. `transformers` `save_pretrained(..., safe_serialization=True)` or the "
        "Hugging Face 'convert to safetensors' space)."
    )


def read_json(path: pathlib.Path) -> Any:
    """The parsed JSON file at ``path``; a `LoadError` naming the file and the line and column where it breaks."""
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise LoadError(
            f"`{path.name}` in {path.parent} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno} "
            f"(character {e.pos} of {len(e.doc)}). The file is probably truncated or corrupt: download or write it "
            "again."
        ) from None
    except UnicodeDecodeError as e:
        raise LoadError(
            f"`{path.name}` in {path.parent} is not UTF-8 text (byte {e.start} is {e.object[e.start : e.start + 1]!r}"
            "), so it is not a JSON file. The file is corrupt: download or write it again."
        ) from None


def _allowed_roots(directory: pathlib.Path) -> tuple[pathlib.Path, ...]:
    """Where a shard may resolve to: the model directory, and for a Hugging Face cache snapshot
    (``models--org--name/snapshots/<rev>``) that repository's ``blobs`` folder, which its files link into."""
    roots = [directory.resolve()]
    if directory.parent.name == "snapshots":
        roots.append((directory.parent.parent / "blobs").resolve())
    return tuple(roots)


def _shard_path(directory: pathlib.Path, index: str, name: Any) -> pathlib.Path:
    """The shard ``name`` of an index: a relative path that stays inside the model directory, links included."""
    roots = _allowed_roots(directory)
    path = directory / name if isinstance(name, str) else None
    inside = (
        path is not None
        and not pathlib.PurePath(name).is_absolute()
        and ".." not in pathlib.PurePath(name).parts
        and any(path.resolve().is_relative_to(root) for root in roots)
    )
    if not inside:
        raise LoadError(
            f"The index `{index}` in {directory} names the shard {name!r}, which lies outside the model directory "
            "(an absolute path, a `..` step or a link that leads out of it). A shard must lie inside the model "
            "directory: finetune reads no file outside it. Fix the index's `weight_map`, or put the shards in the "
            "directory."
        )
    return path


def _shards(directory: pathlib.Path, index: str) -> tuple[pathlib.Path, ...]:
    weight_map = read_json(directory / index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise LoadError(
            f"The index `{index}` in {directory} has no `weight_map` (a mapping of tensor names to shard files). "
            "The file is incomplete: download the checkpoint's index again."
        )
    files = tuple(_shard_path(directory, index, name) for name in dict.fromkeys(weight_map.values()))
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise LoadError(
            f"The index `{index}` in {directory} names shards that are not there: {', '.join(absent)}. "
            "Download the complete checkpoint (all shards) and try again."
        )
    return files


def find_checkpoint(directory: str | os.PathLike, *, allow_pickle: bool = False) -> Checkpoint:
    """Picks the weight files of a checkpoint directory: safetensors, else Flax msgpack, else (opt-in) pickle.

    Args:
      directory: A local checkpoint directory (Hugging Face layout).
      allow_pickle: Whether ``pytorch_model.bin`` may be read (unpickling can execute code).

    Returns:
      The `Checkpoint` to pass to `load_weights`.

    Example:
      >>> find_checkpoint("./my-bert").format
      'safetensors'
    """
    directory = pathlib.Path(directory)
    for name, fmt, sharded in _LAYOUTS:
        if (directory / name).is_file():
            if fmt == "pickle" and not allow_pickle:
                raise pickle_refused(str(directory))
            return Checkpoint(fmt, _shards(directory, name) if sharded else (directory / name,))
    contents = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    raise LoadError(
        f"No weights file in {directory}. Expected `{SAFETENSORS}`, `{SAFETENSORS_INDEX}` with its shards, "
        f"`{FLAX_MSGPACK}` or (with allow_pickle=True) `{PICKLE}`. The directory contains: "
        f"{', '.join(contents) or 'nothing'}. Point to a complete Hugging Face checkpoint directory."
    )


# Hugging Face Flax leaf names -> PyTorch names, and the layout change for kernels (dense: (in, out) -> (out, in);
# conv: (h, w, in, out) -> (out, in, h, w)).
_FLAX_LEAVES = {"kernel": "weight", "embedding": "weight", "scale": "weight"}
_FLAX_KERNEL_AXES = {2: (1, 0), 3: (2, 1, 0), 4: (3, 2, 0, 1)}


def _flax_to_torch(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            out.update(_flax_to_torch(value, f"{prefix}{name}."))
            continue
        value = np.asarray(value)
        if name == "kernel" and value.ndim in _FLAX_KERNEL_AXES:
            value = np.transpose(value, _FLAX_KERNEL_AXES[value.ndim])
        out[prefix + _FLAX_LEAVES.get(name, name)] = value
    return out


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; reinterpret the bits
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _unreadable(file: pathlib.Path, fmt: str, error: BaseException) -> LoadError:
    """The error for a weights file its format's reader cannot parse (empty, truncated, corrupt)."""
    size = file.stat().st_size if file.exists() else 0
    # torch's messages can suggest weights_only=False (running the file's code): such advice is never passed on.
    detail = type(error).__name__ + ("" if "weights_only" in str(error) else f": {error}")
    return LoadError(
        f"`{file.name}` in {file.parent} ({size:,} bytes) is not a readable {fmt} file: {detail}. The file is "
        "probably empty, truncated or corrupt: download it again (all of it), or export the model again."
    )


def _guarded(file: pathlib.Path, fmt: str, read: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
    """``read`` whose failure (a tensor whose bytes are missing or corrupt) is a `LoadError` naming the file."""

    def guarded() -> np.ndarray:
        try:
            return read()
        except LoadError:
            raise
        except Exception as e:  # noqa: BLE001 -- each reader has its own exception types; all mean a bad file
            raise _unreadable(file, fmt, e) from None

    return guarded


def _open_safetensors(stack: contextlib.ExitStack, file: pathlib.Path) -> dict[str, Callable[[], np.ndarray]]:
    f = stack.enter_context(safetensors.safe_open(str(file), framework="numpy"))
    return {key: functools.partial(f.get_tensor, key) for key in f.keys()}  # noqa: SIM118


def _open_msgpack(file: pathlib.Path) -> dict[str, Callable[[], np.ndarray]]:
    tree = flax.serialization.msgpack_restore(file.read_bytes())
    if not isinstance(tree, dict):
        raise TypeError(f"its content is a {type(tree).__name__}, not a mapping of parameter names to arrays")
    arrays = _flax_to_torch(tree["params"] if set(tree) == {"params"} else tree)
    return {key: functools.partial(arrays.pop, key) for key in arrays}


_REFUSED = object()


def _open_pickle(file: pathlib.Path) -> dict[str, Callable[[], np.ndarray]]:
    """A PyTorch ``.bin``, unpickled with ``weights_only=True`` (tensors and plain containers only). Zip files
    (``torch.save`` since 1.6) are memory-mapped; the legacy format cannot be, so it is read whole."""
    import pickle
    import zipfile

    try:
        import torch
    except ImportError as e:
        raise LoadError(
            f"Reading `{file.name}` needs PyTorch, which is not installed. Run `pip install torch` "
            "(the CPU build is enough), or convert the checkpoint to safetensors."
        ) from e
    try:
        tensors = torch.load(str(file), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError:
        tensors = _REFUSED  # raised outside the handler, so that torch's error is not even the context
    if tensors is _REFUSED:
        # torch's message suggests weights_only=False, i.e. running the file's code: never pass that on.
        raise LoadError(
            f"`{file.name}` in {file.parent} holds Python objects other than tensors, which finetune does not "
            "unpickle even with allow_pickle=True: unpickling them could run arbitrary code. Convert the checkpoint "
            "to safetensors with code you trust (e.g. load it in transformers and `save_pretrained(..., "
            "safe_serialization=True)`), or use a checkpoint that has `model.safetensors`."
        )
    if not isinstance(tensors, Mapping) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        kind = f"a {type(tensors).__name__}" + (
            " whose values are not all tensors" if isinstance(tensors, Mapping) else ""
        )
        raise LoadError(
            f"`{file.name}` in {file.parent} holds {kind}, not a mapping of parameter names to tensors (a state "
            "dict), so it is not a Hugging Face weights file. Use the checkpoint's weights file, or save "
            "`model.state_dict()` to safetensors."
        )
    return {key: functools.partial(_torch_to_numpy, t) for key, t in tensors.items()}


@contextlib.contextmanager
def open_checkpoint(checkpoint: Checkpoint) -> Iterator[dict[str, Callable[[], np.ndarray]]]:
    """Opens a checkpoint lazily: yields ``{key: read}``, where ``read()`` returns that one tensor as numpy.

    Safetensors are memory-mapped and read one tensor at a time; msgpack files are read whole (the format has no
    index); pickle files are memory-mapped by ``torch.load(mmap=True, weights_only=True)`` (the legacy non-zip
    format is read whole). A file that its reader cannot parse (empty, truncated, corrupt) is a `LoadError` naming
    the file, whether that shows on opening it or on reading one of its tensors.

    Raises:
      LoadError: A weights file that cannot be read, or a pickle holding anything but tensors.
    """
    with contextlib.ExitStack() as stack:
        readers: dict[str, Callable[[], np.ndarray]] = {}
        for file in checkpoint.files:
            try:
                if checkpoint.format == "safetensors":
                    opened = _open_safetensors(stack, file)
                elif checkpoint.format == "msgpack":
                    opened = _open_msgpack(file)
                else:
                    opened = _open_pickle(file)
            except LoadError:
                raise
            except Exception as e:  # noqa: BLE001 -- safetensors, msgpack and torch each raise their own types
                raise _unreadable(file, checkpoint.format, e) from None
            readers.update({key: _guarded(file, checkpoint.format, read) for key, read in opened.items()})
        yield readers


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
    size (24 BERT layers: 6 s instead of 0.8 s).
    """
    rngs = nnx.Rngs(seed)
    for stream in vars(rngs).values():
        if isinstance(stream, nnx.RngStream):
            stream.count.set_value(np.zeros(stream.count.shape, np.uint32))
    return rngs


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
