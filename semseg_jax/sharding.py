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

from semseg_jax import config as config_lib

DATA_AXIS = 'data'

# Environment variables that announce a multi-process job. On Cloud TPU
# jax.distributed.initialize() discovers everything by itself.
_TPU_ENV = ('TPU_WORKER_HOSTNAMES', 'CLOUD_TPU_TASK_ID', 'MEGASCALE_COORDINATOR_ADDRESS')
# What jax needs to read a SLURM job step (srun sets them; a bare sbatch or
# salloc shell has only some).
_SLURM_ENV = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
              'SLURM_LOCALID')


def _is_multiprocess_env() -> bool:
  """Whether the environment describes a job of several processes to join."""
  if os.environ.get('JAX_COORDINATOR_ADDRESS') or any(os.environ.get(k) for k in _TPU_ENV):
    return True
  # One SLURM task (python run straight from an sbatch script or an salloc
  # shell) is a single process that sees all of its node's devices.
  return all(os.environ.get(k) for k in _SLURM_ENV) and _env_int('SLURM_NTASKS', 1) > 1


def initialize_distributed() -> None:
  """Joins a multi-process job when the environment describes one.

  * ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES``
    and ``JAX_PROCESS_ID``: explicit, e.g. several processes on one machine
    or nodes started by any launcher.
  * Cloud TPU pod slices (``TPU_WORKER_HOSTNAMES``, ...): JAX detects the rest.
  * SLURM: a job step with more than one task (``srun``); JAX reads the
    coordinator, process count and id from ``SLURM_*`` and gives each task
    the one device numbered ``SLURM_LOCALID``, so launch one task per GPU
    (``--ntasks-per-node`` = GPUs per node). A single task needs no set-up and
    sees all of its node's devices.

  A single process with none of these set does nothing. Must run before
  anything touches a device. CPU processes exchange data with gloo (jax's
  default CPU collectives).

  Raises:
    ValueError: ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` are not integers
      in range.
  """
  if not _is_multiprocess_env():
    return
  if jax.distributed.is_initialized():
    return
  kwargs: dict[str, Any] = {}
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    kwargs['coordinator_address'] = os.environ['JAX_COORDINATOR_ADDRESS']
  count = _env_int('JAX_NUM_PROCESSES', minimum=1)
  index = _env_int('JAX_PROCESS_ID', minimum=0)
  if count is not None:
    kwargs['num_processes'] = count
  if index is not None:
    if count is not None and index >= count:
      raise ValueError(f'JAX_PROCESS_ID={index} must be below JAX_NUM_PROCESSES={count}')
    kwargs['process_id'] = index
  jax.distributed.initialize(**kwargs)
  logging.info('joined job as process %d of %d', jax.process_index(),
               jax.process_count())


def _env_int(name: str, minimum: int) -> int | None:
  """``int(os.environ[name])`` or None if unset; a clear error if it is not an int >= minimum."""
  text = os.environ.get(name)
  if not text:
    return None
  try:
    value = int(text)
  except ValueError:
    value = None
  if value is None or value < minimum:
    raise ValueError(f'environment variable {name}={text!r} must be an integer >= {minimum}')
  return value


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
  """Returns the per-process batch.

  Raises:
    config.ConfigError: ``global_batch`` (``config.<key>``) is not a positive
      multiple of the mesh's device count (which makes it a multiple of the
      process count too: every process feeds its devices equally).
  """
  n = mesh.devices.size
  if isinstance(global_batch, bool) or not isinstance(global_batch, (int, np.integer)) or (
      global_batch <= 0 or global_batch % n):
    raise config_lib.ConfigError(
        f'config.{key}={global_batch!r} must be a positive multiple of the '
        f'{n} devices in the mesh')
  return int(global_batch) // jax.process_count()


def make_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice into global arrays sharded over ``'data'``."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
