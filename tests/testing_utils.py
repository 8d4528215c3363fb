"""Helpers shared by tests: a tiny trainer config and a few-step training run."""
from __future__ import annotations

import jax
import numpy as np

from configs import quickstart
from semseg_jax import config as config_lib
from semseg_jax import data as data_lib
from semseg_jax import sharding
from semseg_jax import train
from semseg_jax.data import pipeline


def tiny_config(**overrides):
  """A seconds-long run: a U-Net of width 2..32 on 32x32 `shapes` (dotted overrides)."""
  config = quickstart.get_config()
  config.unlock()
  values = {
      'model.feature_scale': 32,
      'dataset.shapes_image_size': (32, 32),
      'dataset.image_size': (32, 32),
      'dataset.num_train': 16,
      'dataset.num_eval': 6,
      'batch_size': 4,
      'eval_batch_size': 4,
      'num_train_steps': 6,
      'log_every_steps': 2,
      'eval_every_steps': 3,
      'checkpoint_every_steps': 2,
      'num_eval_images_logged': 2,
      'schedule.warmup_steps': 0,
  }
  values.update(overrides)
  for key, value in values.items():
    config_lib.set_value(config, key, value)
  config.lock()
  return config


def model_config(model: dict, **overrides):
  """``tiny_config`` with ``config.model`` replaced by ``model`` (name + options)."""
  config = tiny_config(**overrides)
  config.unlock()
  config.model = dict(model)
  config.lock()
  return config


def train_losses(config, num_steps: int, repeat_first_batch: bool = True) -> list[float]:
  """Losses of ``num_steps`` jitted train steps on `shapes` (one device).

  With ``repeat_first_batch`` the same batch is used every step, so a working
  network must drive its loss down quickly.
  """
  mesh = sharding.create_mesh(jax.devices()[:1])
  source = data_lib.get_source(config.dataset, config.dataset.train_split, data_dir=None)
  iterator = pipeline.make_train_iterator(source, config.dataset, seed=0,
                                          batch_size=config.batch_size,
                                          process_index=0, process_count=1)
  model = train.create_model(config)
  state = train.create_train_state(config, model, mesh)
  step = train.make_train_step(config, mesh, jax.tree.map(lambda x: x.sharding, state))
  batch = None
  losses = []
  for _ in range(num_steps):
    if batch is None or not repeat_first_batch:
      raw = next(iterator)
      batch = sharding.make_global_batch({'image': raw['image'], 'label': raw['label']}, mesh)
    state, metrics = step(state, batch, jax.random.key(0))
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses)), losses
  return losses


# ------------------------------------------- the pytorch-semseg parity oracle


def ptsemseg_oracle() -> tuple[str, str, str]:
  """``(src, python, script)`` of the upstream oracle, or skips the test.

  Parity tests run when PTSEMSEG_SRC names a pytorch-semseg work tree and
  PTSEMSEG_PYTHON a python with torch; the oracle script is
  ``shared/tools/ptsemseg_oracle.py`` beside the repository (or PTSEMSEG_ORACLE).
  """
  import os  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  src, py = os.environ.get('PTSEMSEG_SRC'), os.environ.get('PTSEMSEG_PYTHON')
  if not src or not py:
    pytest.skip('set PTSEMSEG_SRC (pytorch-semseg work tree) and '
                'PTSEMSEG_PYTHON (a python with torch) for the parity test')
  script = os.environ.get('PTSEMSEG_ORACLE') or str(
      pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'tools' / 'ptsemseg_oracle.py')
  if not os.path.exists(script):
    pytest.skip(f'oracle script {script} not found (set PTSEMSEG_ORACLE)')
  if subprocess.run([py, '-c', 'import torch'], capture_output=True).returncode:
    pytest.skip(f'torch is not importable in PTSEMSEG_PYTHON={py}')
  return src, py, script


def oracle_dump(arch: str, h: int, w: int, tmp_path, runner_source: str | None = None
                ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
  """Upstream's state dict, an input ``x`` and its logits ``y`` (both NHWC) for ``arch``.

  The oracle builds upstream's network at ``h x w``; ``runner_source`` replaces
  its ``dump`` command by a script called as ``runner oracle arch h w out``.
  """
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  src, py, script = ptsemseg_oracle()
  out = tmp_path / f'{arch}.npz'
  # Upstream's pspnet/icnet import their caffe_pb2, which new protobufs refuse
  # to load with the C++ backend.
  env = dict(os.environ, PTSEMSEG_SRC=src, PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION='python')
  if runner_source is None:
    cmd = [py, script, 'dump', arch, str(h), str(w), str(out)]
  else:
    runner = tmp_path / 'oracle_runner.py'
    runner.write_text(runner_source)
    cmd = [py, str(runner), script, arch, str(h), str(w), str(out)]
  subprocess.run(cmd, check=True, capture_output=True, env=env)
  with np.load(out) as d:
    sd = {k[3:]: d[k] for k in d.files if k.startswith('sd/')}
    x, ref = d['x'].transpose(0, 2, 3, 1), d['y'].transpose(0, 2, 3, 1)
  out.unlink()  # FCN dumps are ~540 MB
  return sd, x, ref


def assert_matches_oracle(module, variables, x: np.ndarray, ref: np.ndarray) -> None:
  """Eval-mode logits of ``module`` equal upstream's to 1e-4 of the logit scale.

  float32 through tens of layers gives ~1e-6 of the scale in practice.
  """
  y = jax.jit(lambda v, x: module.apply(v, x, train=False).logits)(variables, x)
  assert y.shape == ref.shape
  np.testing.assert_allclose(np.asarray(y), ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


# ----------------------------------------------- shapes of networks, no FLOPs

KEY = jax.random.key(0, impl='rbg')  # 'rbg' keys compile fast on CPU


def param_count(tree) -> int:
  """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_apply(model, hw: tuple[int, int], *, train: bool = False, batch: int = 1,
                   channels: int = 3):
  """``(variables, output)`` of ``model`` on a ``[batch, *hw, channels]`` input, as shapes.

  ``jax.eval_shape`` only: full-size networks cost no compute. In train mode
  the BatchNorm statistics are mutable and dropout gets a key.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jax.ShapeDtypeStruct((batch, *hw, channels), jnp.float32)
  v = jax.eval_shape(lambda x: model.init(KEY, x, train=False), x)
  if train:
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, rngs={'dropout': KEY},
                                                  mutable=['batch_stats'])[0], v, x)
  else:
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), v, x)
  return v, out


def noise_variables(model, hw: tuple[int, int], seed: int = 0):
  """Variables of ``model`` filled with numpy noise in [0.5, 1.5] (no XLA compile)."""
  v, _ = abstract_apply(model, hw)
  r = np.random.default_rng(seed)
  return jax.tree.map(lambda s: r.uniform(0.5, 1.5, s.shape).astype(np.float32), v)
