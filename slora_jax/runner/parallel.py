"""Device mesh, placement and multi-host start for data-parallel training.

One mesh axis, ``data``, spans every device of every host. Batches are split
along it; backbone, adapters, head and optimiser state are replicated. XLA
inserts the gradient all-reduce, so the step has no ``pmean``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

__all__ = ["make_mesh", "replicated", "batch_sharding", "replicate",
           "global_batch", "maybe_initialize_distributed"]


PROCESS_COUNT_ENV = "SLORA_JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "SLORA_JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return None if value in (None, "") else int(value)


def maybe_initialize_distributed(enabled: bool) -> None:
  """Calls ``jax.distributed.initialize()`` once, when running on several hosts.

  Cloud TPU VMs, Slurm, Open MPI and Kubernetes need nothing more; elsewhere
  set JAX's ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0) and, as
  JAX reads no variable for them, ``SLORA_JAX_NUM_PROCESSES`` and
  ``SLORA_JAX_PROCESS_ID``. Must run before any JAX computation.
  """
  if not enabled or jax.distributed.is_initialized():
    return
  jax.distributed.initialize(num_processes=_env_int(PROCESS_COUNT_ENV),
                             process_id=_env_int(PROCESS_ID_ENV))
  logging.info("process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D ``data`` mesh over ``devices`` (default: all devices of all hosts)."""
  if devices is None:
    return jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
  return jax.sharding.Mesh(np.asarray(devices), ("data",),
                           axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def replicate(tree: Any, mesh) -> Any:
  """Places every leaf of ``tree`` on all devices of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))


def global_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Assembles this host's rows into global arrays sharded over ``data``."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local.items()}
