"""Arrays onto devices: the logical axes of a variable, placement of trees and keys, gathering to one host."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx


def logical_axes(var: nnx.Variable) -> tuple | None:
    """The logical axis names of a variable (``out_sharding`` metadata; older flax: ``sharding_names``)."""
    meta = var.get_metadata()
    names = meta.get("out_sharding", meta.get("sharding_names"))
    return tuple(names) if names is not None else None


def flat_axes(axes: Any) -> list[str]:
    """The mesh axes named in a list of per-dimension entries (None, a name, or a tuple of names)."""
    return [a for entry in axes if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]


def _key_parts(keypath: Any) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in keypath)


def mirror_params(opt: Any, params: Any, param_shardings: Any, other: Any) -> Any:
    """Shardings for an optimizer state: a leaf whose key path ends with a parameter's path and that has the
    parameter's shape gets the parameter's sharding; every other leaf gets ``other``.

    Works for any optax state that keeps per-parameter trees (``mu``/``nu`` inside partition, MultiSteps,
    apply_if_finite...). Factored statistics (adafactor's row/column vectors) have other shapes and are replicated.
    """
    index = {}
    for (kp, leaf), sharding in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_shardings), strict=True
    ):
        index[_key_parts(kp)] = (tuple(np.shape(leaf)), sharding)

    def pick(kp, leaf):
        keys = _key_parts(kp)
        for start in range(len(keys)):
            hit = index.get(keys[start:])
            if hit is not None and hit[0] == tuple(np.shape(leaf)):
                return hit[1]
        return other

    return jax.tree_util.tree_map_with_path(pick, opt)


def put(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """``x`` (numpy or jax, the same value on every process) as an array with ``sharding``.

    Single process: `jax.device_put`. Several processes: each process puts only its own shards from its copy
    (`jax.make_array_from_callback`), with no collective, so it is safe on a background thread.
    """
    if isinstance(x, jax.Array) and x.committed and x.sharding == sharding:
        return x
    if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place(tree: Any, shardings: Any) -> Any:
    """`put` over a tree of arrays and a matching tree of shardings."""
    return jax.tree.map(put, tree, shardings)


def bytes_per_device(tree: Any) -> dict[int, int]:
    """``{device id: bytes}`` that the arrays of ``tree`` occupy on each (addressable) device.

    Example:
      >>> bytes_per_device(trainer.state["params"])     # under fsdp on 8 devices: about total / 8 each
    """
    out: dict[int, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
    return out


def host_local(module: nnx.Module) -> nnx.Module:
    """``module`` itself when every array is addressable here, else a copy whose arrays are gathered onto this host.

    Gathering is a collective: on several hosts every process must call this (export does, then only process 0
    writes).
    """
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)  # type: ignore[misc]
    if all(x.is_fully_addressable for x in jax.tree.leaves(params)):
        return module
    from jax.experimental import multihost_utils

    gathered = jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True), params)
    return nnx.merge(graphdef, gathered, rest)
