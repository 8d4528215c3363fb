"""Device mesh, shardings and multi-host set-up for data-parallel training.

The whole library uses one mesh axis, ``'data'``: the batch is split over it and
the train state is replicated. The same code runs on one CPU, on
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` CPUs, on 8 GPUs and on a
multi-host TPU pod (where each process feeds only its local slice of the batch).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'

# Environment variables that announce a multi-process job. On Cloud TPU and
# under SLURM jax.distributed.initialize() discovers everything by itself.
_CLUSTER_ENV = ('JAX_COORDINATOR_ADDRESS', 'SLURM_JOB_ID', 'TPU_WORKER_HOSTNAMES',
                'CLOUD_TPU_TASK_ID', 'MEGASCALE_COORDINATOR_ADDRESS')


def initialize_distributed() -> None:
  """Joins a multi-process job when the environment describes one.

  ``JAX_COORDINATOR_ADDRESS`` (host:port), ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID`` configure it explicitly (e.g. several processes on one
  machine); on TPU pods and SLURM clusters JAX detects the rest. A single
  process with none of these set does nothing.
  """
  if not any(os.environ.get(k) for k in _CLUSTER_ENV):
    return
  if jax.distributed.is_initialized():
    return
  kwargs: dict[str, Any] = {}
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    kwargs['coordinator_address'] = os.environ['JAX_COORDINATOR_ADDRESS']
  if os.environ.get('JAX_NUM_PROCESSES'):
    kwargs['num_processes'] = int(os.environ['JAX_NUM_PROCESSES'])
  if os.environ.get('JAX_PROCESS_ID'):
    kwargs['process_id'] = int(os.environ['JAX_PROCESS_ID'])
  jax.distributed.initialize(**kwargs)
  logging.info('joined job as process %d of %d', jax.process_index(),
               jax.process_count())


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis ``'data'`` over ``devices`` (default: all devices)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over ``'data'``, the rest whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """The same full array on every device (train state, scalars)."""
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh, key: str = 'batch_size') -> int:
  """Returns the per-process batch; raises if ``global_batch`` cannot be split."""
  n = mesh.devices.size
  if global_batch <= 0 or global_batch % n:
    raise ValueError(
        f'config.{key}={global_batch} must be a positive multiple of the '
        f'{n} devices in the mesh')
  return global_batch // jax.process_count()


def make_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice into global arrays sharded over ``'data'``."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
