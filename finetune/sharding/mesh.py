"""The device mesh: its axes (``data``, ``model``), the strategies, the logical-axis rules table, and mesh shapes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import AxisType, Mesh

from finetune.errors import ConfigError

DATA, MODEL = "data", "model"
STRATEGIES = ("data", "fsdp", "tensor", "fsdp+tensor")

# Logical axis -> mesh axis (None: replicated). ``vocab`` stays replicated: vocabularies (30522, 50257) rarely divide
# the model axis, and the embedding is a small share of the parameters of the models fine-tuned here.
DEFAULT_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "vocab": None,
    "embed": None,
    "mlp": MODEL,
    "heads": MODEL,
    "kv": None,
    "norm": None,
    "classes": None,
    "layers": None,
}


def axis_size(mesh: Mesh, axis: str) -> int:
    return dict(mesh.shape).get(axis, 1)


def make_mesh(shape: Mapping[str, int], *, devices: Any = None) -> Mesh:
    """A ``("data", "model")`` mesh of the given shape, built with `jax.make_mesh` (auto-sharded axes).

    Args:
      shape: ``{"data": d, "model": m}``; a missing axis is 1, and one axis may be ``-1`` (all remaining devices).
      devices: The devices to use (default: all devices of every process).

    Returns:
      The `jax.sharding.Mesh`.

    Example:
      >>> make_mesh({"data": -1, "model": 2})   # on 8 devices: Mesh('data': 4, 'model': 2)
    """
    devices = list(jax.devices() if devices is None else devices)
    unknown = sorted(set(shape) - {DATA, MODEL})
    sizes = {axis: shape.get(axis, 1) for axis in (DATA, MODEL)}
    bad = {k: v for k, v in sizes.items() if not isinstance(v, int) or (v < 1 and v != -1)}
    if unknown or bad or list(sizes.values()).count(-1) > 1:
        raise ConfigError(
            f"A mesh shape maps the axes 'data' and 'model' to positive sizes (one may be -1); received {dict(shape)}. "
            'Example: mesh={"data": 4, "model": 2}.'
        )
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if -1 in sizes.values():
        if len(devices) % fixed:
            raise ConfigError(
                f"The mesh shape {dict(shape)} needs the device count ({len(devices)}) to be a multiple of {fixed}. "
                "Give both axis sizes explicitly."
            )
        sizes = {k: len(devices) // fixed if v == -1 else v for k, v in sizes.items()}
    if math.prod(sizes.values()) > len(devices):
        raise ConfigError(
            f"The mesh shape {sizes} needs {math.prod(sizes.values())} devices, and there are {len(devices)} "
            f"({devices[0].platform}). Pick axis sizes whose product is at most {len(devices)}."
        )
    return jax.make_mesh(tuple(sizes.values()), (DATA, MODEL), (AxisType.Auto,) * 2, devices=devices)


def default_shape(strategy: str, devices: int) -> dict[str, int]:
    """The mesh shape a named strategy uses on ``devices`` devices (see the module docstring)."""
    if strategy == "tensor":
        return {DATA: 1, MODEL: devices}
    if strategy == "fsdp+tensor" and devices % 2 == 0:
        return {DATA: devices // 2, MODEL: 2}
    return {DATA: devices, MODEL: 1}


def parse_mesh(text: str) -> str | dict[str, int]:
    """The command line's ``--mesh``: a strategy name, or ``data=4,model=2``.

    Example:
      >>> parse_mesh("data=4,model=2")
      {'data': 4, 'model': 2}
    """
    if "=" not in text:
        return text
    shape = {}
    for part in text.split(","):
        axis, _, size = part.partition("=")
        try:
            shape[axis.strip()] = int(size)
        except ValueError:
            raise ConfigError(
                f"`--mesh` takes a strategy ({', '.join(STRATEGIES)}) or axis sizes like data=4,model=2; "
                f"received {text!r}."
            ) from None
    return shape
