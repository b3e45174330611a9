"""Sharding: a device mesh, one logical-axis rules table, and the shardings of parameters, optimizer state and batches.

Sharding is metadata. Every parameter of finetune's architectures names its logical axes (``out_sharding`` metadata,
e.g. ``("embed", "mlp")``); one table (`DEFAULT_RULES`, overridable with ``sharding_rules=``) maps logical axes to the
mesh axes ``data`` and ``model``; the optimizer state takes the sharding of the parameter it belongs to; batches are
split along ``data``. Nothing in the models or the train step changes: XLA inserts the collectives.

Strategies, for ``fit(mesh=...)``, ``compile(sharding=...)`` and ``load(mesh=...)``, on ``n`` devices:

* ``data`` (mesh ``{"data": n}``): parameters replicated; each device takes ``batch_size / n`` rows.
* ``fsdp`` (mesh ``{"data": n}``): as ``data``, and every parameter (with its optimizer state) is split over
  ``data`` along its largest dimension that the data-axis size divides; a vector with no such dimension (the bias of
  a 2-label classifier on 8 devices) stays replicated, a matrix with none is an error.
* ``tensor`` (mesh ``{"model": n}``): the rules table splits attention heads and the MLP over ``model``.
* ``fsdp+tensor`` (mesh ``{"data": n / 2, "model": 2}``): both.

An explicit mesh shape (``{"data": 4, "model": 2}``, one axis may be ``-1``) or a `jax.sharding.Mesh` with a
``data`` axis works too; a strategy and a shape combine (``compile(sharding="fsdp")`` then
``fit(mesh={"data": 4, "model": 2})``). Several hosts: call `initialize` first; every process runs the same script.

Example:
  >>> model.fit(train, batch_size=32, mesh="fsdp")                        # all local devices
  >>> model.fit(train, batch_size=32, mesh={"data": 4, "model": 2}, sharding_rules={"vocab": "model"})
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from finetune.errors import ConfigError
from finetune.params.rules import path_str

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


def _axis_size(mesh: Mesh, axis: str) -> int:
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


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where every array of a run lives: the mesh, the strategy, and the logical-axis rules.

    Build it with `resolve`. Methods give the shardings of module variables (`variable_shardings`), of a whole
    training state (`state_shardings`) and of batches (`batch`, `put_batch`).

    Attributes:
      mesh: The device mesh, with a ``data`` axis and usually a ``model`` axis.
      strategy: One of `STRATEGIES`.
      rules: Logical axis -> mesh axis (or a tuple of mesh axes, or None).
      user_rules: The logical axes the user mapped (each must be used by some parameter).
      explicit_shape: Whether the mesh shape was given (not the strategy's default).
    """

    mesh: Mesh
    strategy: str = "data"
    rules: Mapping[str, Any] = dataclasses.field(default_factory=lambda: dict(DEFAULT_RULES))
    user_rules: tuple[str, ...] = ()
    explicit_shape: bool = False

    @property
    def fsdp(self) -> bool:
        return self.strategy.startswith("fsdp")

    @property
    def data_size(self) -> int:
        return _axis_size(self.mesh, DATA)

    @property
    def model_size(self) -> int:
        return _axis_size(self.mesh, MODEL)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch(self) -> NamedSharding:
        """Batches: rows split over the data axis."""
        return NamedSharding(self.mesh, P(DATA))

    def __str__(self) -> str:
        return f"strategy {self.strategy!r} on the mesh {dict(self.mesh.shape)}"

    # ------------------------------------------------------------------ parameters
    def spec(self, path: str, shape: tuple[int, ...], names: tuple | None, problems: list[str]) -> P:
        """The partition spec of one parameter from its logical axis names; problems are appended, not raised."""
        where = f"`{path}` with shape {tuple(shape)}"
        if names is not None and len(names) != len(shape):
            problems.append(f"{where} names {len(names)} logical axes {names}. Fix its `out_sharding` metadata.")
            return P()
        axes = self._rule_axes(where, shape, names or (None,) * len(shape), problems)
        if len(shape) >= 2 and names is None and self.model_size > 1:
            problems.append(
                f"{where} has no logical axis names (`out_sharding` metadata), so the model axis (size "
                f"{self.model_size}) cannot split it and it would silently stay replicated. Fix: create it with "
                "names (e.g. nnx.Linear(..., kernel_metadata={'out_sharding': ('embed', 'mlp')})), or use strategy "
                "'data' or 'fsdp'."
            )
        if self.fsdp and self.data_size > 1 and DATA not in _flat(axes):
            self._fsdp_axis(where, shape, axes, problems)
        while axes and axes[-1] is None:
            axes.pop()
        return P(*axes)

    def _rule_axes(self, where: str, shape: tuple[int, ...], names: tuple, problems: list[str]) -> list[Any]:
        """Mesh axes per dimension from the rules table (mesh axes of size 1 dropped)."""
        axes: list[Any] = [None] * len(shape)
        for i, name in enumerate(names):
            if name is None:
                continue
            if name not in self.rules:
                problems.append(
                    f"{where}: logical axis {name!r} is not in the rules table ({', '.join(sorted(self.rules))}). "
                    f"Fix: add it, e.g. sharding_rules={{{name!r}: None}}."
                )
                continue
            target = self.rules[name]
            mesh_axes = tuple(
                a for a in ((target,) if isinstance(target, str) else target or ()) if _axis_size(self.mesh, a) > 1
            )
            size = math.prod(_axis_size(self.mesh, a) for a in mesh_axes)
            twice = sorted(set(_flat(axes)) & set(mesh_axes))
            if twice:
                problems.append(
                    f"{where}: two of its dimensions map to mesh axis {twice}. Fix: map {name!r} elsewhere in "
                    "sharding_rules."
                )
            elif shape[i] % size:
                problems.append(
                    f"{where}: dimension {i} (logical axis {name!r}, size {shape[i]}) does not divide over mesh axis "
                    f"{mesh_axes} of size {size}. Fix: pick a mesh whose {mesh_axes} size divides {shape[i]}, or map "
                    f"{name!r} to None in sharding_rules."
                )
            elif mesh_axes:
                axes[i] = mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes
        return axes

    def _fsdp_axis(self, where: str, shape: tuple[int, ...], axes: list[Any], problems: list[str]) -> None:
        """Puts ``data`` on the largest free dimension it divides. A matrix with none is an error (it would stay
        whole on every device); a vector with none (a 2-label classifier bias) stays replicated: a few bytes."""
        free = [i for i in range(len(shape)) if axes[i] is None and shape[i] % self.data_size == 0]
        if free:
            axes[max(free, key=lambda i: (shape[i], -i))] = DATA
        elif len(shape) >= 2:
            problems.append(
                f"{where}: no free dimension divides the data-axis size {self.data_size}, so under "
                f"{self.strategy!r} it would stay fully replicated on every device. Fix: use a data-axis size that "
                f"divides one of {tuple(shape)}, or strategy 'data' / 'tensor'."
            )

    def _check(self, problems: list[str], used_axes: set[str]) -> None:
        unused = [name for name in self.user_rules if name not in used_axes]
        problems += [f"sharding_rules maps {name!r}, and no parameter has that logical axis." for name in unused]
        if problems:
            listing = "\n".join(f"  - {p}" for p in problems)
            raise ConfigError(
                f"The model cannot be sharded with {self} ({len(problems)} problem(s)):\n{listing}\n"
                "Every problem names its fix; `finetune.sharding.DEFAULT_RULES` is the rules table."
            )

    def variable_shardings(self, variables: Mapping[str, nnx.Variable]) -> dict[str, NamedSharding]:
        """``{path: sharding}`` of module variables (abstract ones too): parameters by their logical axes, the
        rest (RNG state...) replicated. Raises one `ConfigError` listing every parameter that cannot be sharded."""
        problems: list[str] = []
        out, used = {}, set()
        for path, var in variables.items():
            if not isinstance(var, nnx.Param):
                out[path] = self.replicated
                continue
            names = logical_axes(var)
            used.update(n for n in names or () if n is not None)
            out[path] = NamedSharding(self.mesh, self.spec(path, np.shape(var.get_value()), names, problems))
        self._check(problems, used)
        return out

    def state_shardings(self, module: nnx.Module, state: Any) -> Any:
        """The shardings of a training state (`finetune.training.step.Program.init_state`, abstract is fine).

        ``params`` / ``frozen`` / ``rest`` follow the module's variables by path; every optimizer-state leaf that
        mirrors a parameter (``mu``, ``nu``, ... at the parameter's path, with its shape) takes exactly that
        parameter's sharding; scalars (step, counts, learning rates) and metric sums are replicated.
        """
        variables = {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(module))}
        flat = self.variable_shardings(variables)
        out = jax.tree.map(lambda _: self.replicated, state)
        for part in ("params", "frozen", "rest"):
            out[part] = jax.tree_util.tree_map_with_path(lambda kp, _: flat[path_str(kp)], state[part])
        if state.get("opt") is not None:
            out["opt"] = mirror_params(state["opt"], state["params"], out["params"], self.replicated)
        return out

    # ------------------------------------------------------------------ batches
    def check_batch(self, batch: Mapping[str, Any]) -> None:
        """Raises `ConfigError` when the batch's rows do not divide over the data axis."""
        rows = {int(np.shape(v)[0]) for v in batch.values() if np.ndim(v) > 0}
        bad = sorted(r for r in rows if r % self.data_size)
        if bad:
            size = self.data_size
            raise ConfigError(
                f"`batch_size`={bad[0]} does not divide over the data axis of {self} ({size} devices). Use a "
                f"batch size that is a multiple of {size} (e.g. {-(-bad[0] // size) * size}), or a smaller data axis."
            )

    def put_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """One global batch (the same on every process) as arrays split over the data axis."""
        self.check_batch(batch)
        return {k: put(v, self.batch) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Resolution of the user's options
# ---------------------------------------------------------------------------------------------------------------------


def resolve(*specs: Any, rules: Mapping[str, Any] | None = None) -> Layout | None:
    """The layout from the user's options, later ones winning: e.g. ``resolve(model.layout, fit_mesh)``.

    Args:
      *specs: Each None, a strategy name (`STRATEGIES`), a mesh shape ``{"data": d, "model": m}``, a
        `jax.sharding.Mesh` with a ``data`` axis, or a `Layout`. A name sets the strategy and a shape the mesh, so
        ``resolve("fsdp", {"data": 4, "model": 2})`` is fsdp on that mesh.
      rules: Logical axis -> mesh axis overrides merged over `DEFAULT_RULES` (e.g. ``{"vocab": "model"}``).

    Returns:
      The `Layout`, or None when nothing asks for sharding (the single-device path).

    Example:
      >>> dict(resolve("fsdp+tensor").mesh.shape)      # on 8 devices
      {'data': 4, 'model': 2}
    """
    strategy, mesh, base_rules, user = None, None, dict(DEFAULT_RULES), ()
    for spec in specs:
        if spec is None:
            continue
        if isinstance(spec, Layout):
            strategy, base_rules, user = spec.strategy, dict(spec.rules), spec.user_rules
            mesh = spec.mesh if spec.explicit_shape else mesh
        elif isinstance(spec, str):
            if spec not in STRATEGIES:
                raise ConfigError(
                    f"`mesh` / `sharding` must be one of {', '.join(STRATEGIES)}, a mesh shape like "
                    f'{{"data": 4, "model": 2}}, or a jax Mesh; received {spec!r}.'
                )
            strategy = spec
        elif isinstance(spec, Mesh):
            if DATA not in spec.axis_names:
                raise ConfigError(f"A mesh for finetune needs a 'data' axis; received axes {spec.axis_names}.")
            mesh = spec
        elif isinstance(spec, Mapping):
            mesh = make_mesh(spec)
        else:
            raise ConfigError(f"`mesh` must be a strategy name, a shape dict or a jax Mesh; received {spec!r}.")
    if strategy is None and mesh is None and rules is None:
        return None
    explicit = mesh is not None
    if strategy is None:
        strategy = "tensor" if explicit and _axis_size(mesh, MODEL) > 1 else "data"
    if mesh is None:
        mesh = make_mesh(default_shape(strategy, jax.device_count()))
    if rules:
        _validate_rules(rules, mesh)
        base_rules.update(rules)
        user = tuple(dict.fromkeys([*user, *rules]))
    return Layout(mesh, strategy, base_rules, user, explicit)


def _validate_rules(rules: Mapping[str, Any], mesh: Mesh) -> None:
    for name, target in rules.items():
        targets = (target,) if isinstance(target, str) else target
        if targets is not None and not (isinstance(targets, tuple) and all(t in mesh.axis_names for t in targets)):
            raise ConfigError(
                f"`sharding_rules` maps logical axes to mesh axes ({', '.join(mesh.axis_names)}), a tuple of them, "
                f"or None; received {name!r}: {target!r}. Example: sharding_rules={{'vocab': 'model'}}."
            )


# ---------------------------------------------------------------------------------------------------------------------
# Paths, metadata, placement
# ---------------------------------------------------------------------------------------------------------------------


def logical_axes(var: nnx.Variable) -> tuple | None:
    """The logical axis names of a variable (``out_sharding`` metadata; older flax: ``sharding_names``)."""
    meta = var.get_metadata()
    names = meta.get("out_sharding", meta.get("sharding_names"))
    return tuple(names) if names is not None else None


def _flat(axes: Any) -> list[str]:
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
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    if all(x.is_fully_addressable for x in jax.tree.leaves(params)):
        return module
    from jax.experimental import multihost_utils

    gathered = jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True), params)
    return nnx.merge(graphdef, gathered, rest)


# ---------------------------------------------------------------------------------------------------------------------
# Several hosts
# ---------------------------------------------------------------------------------------------------------------------


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Any = None,
) -> None:
    """Joins a multi-process run (`jax.distributed.initialize`); call it before anything else touches JAX.

    Missing arguments come from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; with none
    of them, JAX detects the cluster itself (TPU pod slices, SLURM, Open MPI). CPU processes exchange data with gloo.
    Calling it again in an initialized process does nothing.

    Args:
      coordinator_address: ``host:port`` of process 0.
      num_processes: How many processes take part.
      process_id: This process's index, 0 .. num_processes - 1.
      local_device_ids: Restrict this process to these local devices.

    Example:
      >>> finetune.sharding.initialize("10.0.0.1:1234", num_processes=2, process_id=0)
    """
    if jax.distributed.is_initialized():
        return
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only used by CPU processes
    jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids=local_device_ids)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"The environment variable {name} must be an integer; received {value!r}.") from None


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes exports and pushes (True in a single-process run)."""
    return jax.process_index() == 0
