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

from finetune.sharding.hosts import initialize, is_main_process
from finetune.sharding.layout import Layout, resolve
from finetune.sharding.mesh import DATA, DEFAULT_RULES, MODEL, STRATEGIES, default_shape, make_mesh, parse_mesh
from finetune.sharding.placement import bytes_per_device, host_local, logical_axes, mirror_params, place, put

__all__ = [
    "DATA",
    "DEFAULT_RULES",
    "MODEL",
    "STRATEGIES",
    "Layout",
    "bytes_per_device",
    "default_shape",
    "host_local",
    "initialize",
    "is_main_process",
    "logical_axes",
    "make_mesh",
    "mirror_params",
    "parse_mesh",
    "place",
    "put",
    "resolve",
]
