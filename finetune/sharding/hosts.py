"""Several hosts: joining a multi-process run, and which process writes."""

from __future__ import annotations

import os
from typing import Any

import jax

from finetune.errors import ConfigError


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
