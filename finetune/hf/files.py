"""Finding and reading the weight files of a checkpoint directory: safetensors (single or sharded), Hugging Face
Flax msgpack, and (opt-in) PyTorch pickles; and JSON files read with errors that name the file and the position.

Every file a reader cannot parse is a `LoadError` naming the file; an index may only name shards inside the model
directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import pathlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.serialization
import numpy as np
import safetensors

from finetune.errors import LoadError

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
    if not isinstance(name, str) or not name:
        raise LoadError(
            f"The index `{index}` in {directory} names the shard {name!r}, which is not a file name. The index is "
            "corrupt: download the checkpoint's index again."
        )
    roots = _allowed_roots(directory)
    path = directory / name
    inside = (
        not pathlib.PurePath(name).is_absolute()
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
    names: list[Any] = []  # the shards in order of first mention (values may be unhashable in a corrupt index)
    for name in weight_map.values():
        if name not in names:
            names.append(name)
    files = tuple(_shard_path(directory, index, name) for name in names)
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
