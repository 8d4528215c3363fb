"""glibc malloc settings that keep XLA:CPU's step buffers mapped.

XLA:CPU gives every execution of a compiled program one fresh temporary
buffer (all of the program's intermediates: 138 MiB for SegNet's train step
at 2x96x96) and frees it when the step ends. glibc serves a request that
large with ``mmap`` and returns it with ``munmap``, so every step touches
fresh pages again: SegNet's step took 35,450 minor page faults (138 MiB of
zeroed pages) each time, and its element-wise loops ran at page-fault speed.

:func:`tune_cpu_malloc` makes glibc keep such blocks in its heap: one arena
(XLA's worker threads allocate from the main heap, which alone honours the
next two), ``mmap`` only from 2 GiB (mallopt's largest value; a larger temp
buffer is still mapped afresh), and up to 2 GiB of freed memory kept. Later
steps reuse the same pages: SegNet's step took 0 faults in most runs (a few
steps still fault while glibc's heap settles around the buffer) and ran
5-30% faster in four alternating pairs of processes (experiments/RESULTS.md,
attempt 25). The cost is memory: freed blocks stay mapped, so the process
keeps its peak, and the heap settles 10-15% higher (SegNet: 1.07-1.10 ->
1.22-1.23 GiB resident). PyTorch's eager step makes many smaller
allocations that glibc already recycles: it gained nothing from the same
settings.

The settings must be made before JAX starts its CPU backend: XLA's worker
threads bind to a malloc arena when they are created, and a thread bound to
another arena keeps mapping fresh pages (measured: no change when set after
``jax.devices()``). ``python -m semseg_jax.main`` calls it first thing when
JAX will run on the CPU (:func:`cpu_backend_expected`: on a GPU or TPU host
the step's buffers live on the device, and one arena would only serialise
the host's data-loading threads); the benchmarks call it on both sides. A
script of your own calls it before its first JAX operation.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import sys

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# mallopt takes a C int, so 2 GiB - 1 is the largest value it can be given.
_LIMIT = (1 << 31) - 1
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, _LIMIT),
             (_M_TRIM_THRESHOLD, _LIMIT))


class TooLateError(RuntimeError):
  """JAX's backends were started before :func:`tune_cpu_malloc`."""


def _backends_started() -> bool:
  jax = sys.modules.get('jax')
  if jax is None:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False  # an unknown jax: cannot tell, assume in time


def cpu_backend_expected() -> bool:
  """Whether JAX will compute on the CPU, judged without starting it: the
  first of ``JAX_PLATFORMS`` (or ``jax_platforms``) when set, else whether
  no accelerator plugin is installed (``libtpu``, or a ``jax_plugins`` entry
  point such as the CUDA and ROCm plugins)."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if not platforms and 'jax' in sys.modules:
    platforms = sys.modules['jax'].config.jax_platforms or ''
  if platforms.strip():
    return platforms.split(',')[0].strip().lower() == 'cpu'
  if importlib.util.find_spec('libtpu') is not None:
    return False
  return not list(importlib.metadata.entry_points(group='jax_plugins'))


def tune_cpu_malloc(strict: bool = False) -> bool:
  """Applies the settings of the module docstring; returns whether they took.

  Nothing happens (``False``) off glibc, or when JAX's backends have already
  started, which ``strict=True`` reports as :class:`TooLateError` instead.
  Calling it again is harmless.
  """
  if _backends_started():
    if strict:
      raise TooLateError(
          'tune_cpu_malloc() must run before the first JAX operation (its '
          'CPU backend has started; its threads keep their malloc arenas)')
    return False
  if not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc':
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in _SETTINGS)
