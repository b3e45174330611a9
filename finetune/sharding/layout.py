"""Where every array of a run lives (`Layout`), resolved from the user's options (`resolve`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from finetune.errors import ConfigError
from finetune.params.rules import path_str
from finetune.sharding.mesh import DATA, DEFAULT_RULES, MODEL, STRATEGIES, axis_size, default_shape, make_mesh
from finetune.sharding.placement import flat_axes, logical_axes, mirror_params, put


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
        return axis_size(self.mesh, DATA)

    @property
    def model_size(self) -> int:
        return axis_size(self.mesh, MODEL)

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
        if self.fsdp and self.data_size > 1 and DATA not in flat_axes(axes):
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
                a for a in ((target,) if isinstance(target, str) else target or ()) if axis_size(self.mesh, a) > 1
            )
            size = math.prod(axis_size(self.mesh, a) for a in mesh_axes)
            twice = sorted(set(flat_axes(axes)) & set(mesh_axes))
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
        out: dict[str, NamedSharding] = {}
        used: set[str] = set()
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
    strategy: str | None = None
    mesh: Mesh | None = None
    base_rules = dict(DEFAULT_RULES)
    user: tuple[str, ...] = ()
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
        strategy = "tensor" if mesh is not None and axis_size(mesh, MODEL) > 1 else "data"
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
