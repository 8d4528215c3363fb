"""Test set-up: the repository root on sys.path, so `configs` and `semseg_jax` import.

Float32 matrix products and convolutions run at full precision: on GPUs XLA's
default uses TF32 (10-bit mantissas), which numerics checks at 1e-5 would
trip over; on CPUs this changes nothing. Set through the environment, before
jax is imported, so that subprocesses of the tests inherit it.
"""
import os
import sys

os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')

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
