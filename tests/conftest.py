"""Test set-up: the repository root on sys.path, so `configs` and `semseg_jax` import.

Float32 matrix products and convolutions run at full precision: on GPUs XLA's
default uses TF32 (10-bit mantissas), which numerics checks at 1e-5 would
trip over; on CPUs this changes nothing. Set through the environment, before
jax is imported, so that subprocesses of the tests inherit it.
"""
import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')

# One persistent XLA compilation cache for the whole run, shared by the xdist
# workers and the subprocesses the tests start (they inherit the
# environment): the same train step compiled by several fault, CLI and
# multi-process runs is compiled once (tests/test_faults.py: 183 -> 103 s).
# Small programs too: an eager `model.init` compiles one per initializer
# shape, ~0.1-0.7 s each on XLA:CPU (a tiny U-Net: 23 s cold, 2.7 s cached).
# The controller makes a fresh directory and removes it at exit; a
# JAX_COMPILATION_CACHE_DIR set by the caller is used as it is.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='semseg_jax_test_xla_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  atexit.register(shutil.rmtree, _cache, True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# Property tests draw the same examples on every run (CI stays reproducible);
# HYPOTHESIS_PROFILE=explore draws fresh ones.
try:
  from hypothesis import settings as _settings
except ImportError:  # pragma: no cover - hypothesis is in the [test] extra
  pass
else:
  _settings.register_profile('ci', derandomize=True, deadline=None)
  _settings.register_profile('explore', derandomize=False, deadline=None)
  _settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'ci'))
