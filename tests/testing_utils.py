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
