"""Loading and checking ml_collections configs.

A config file is a Python file with ``get_config() -> ConfigDict`` (see
``configs/default.py``). :func:`load_config` accepts a path or the name of a
file in ``configs/`` and applies dotted overrides; :func:`validate_config`
rejects impossible values with an error that names the key.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Mapping

import ml_collections

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')

_CHOICES = {
    'dtype': ('float32', 'bfloat16'),
    'optimizer.name': ('sgd', 'adam', 'adamw', 'rmsprop'),
    'schedule.name': ('poly', 'cosine', 'step', 'exponential', 'constant'),
    'loss.name': ('cross_entropy', 'bootstrapped_cross_entropy'),
    'eval_checkpoint': ('latest', 'best'),
}
_POSITIVE = ('num_classes', 'batch_size', 'eval_batch_size', 'num_train_steps',
             'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
             'keep_checkpoints')


class ConfigError(ValueError):
  """A config key is unknown, has the wrong type or an impossible value."""


def _split_arg(path_or_name: str) -> tuple[str, str | None]:
  """``'configs/pspnet.py:ade20k'`` -> (path, 'ade20k'), as ml_collections' flags do."""
  if ':' in path_or_name and not os.path.isfile(path_or_name):
    path, arg = path_or_name.rsplit(':', 1)
    return path, arg
  return path_or_name, None


def _resolve(path_or_name: str) -> str:
  if os.path.isfile(path_or_name):
    return path_or_name
  candidate = os.path.join(_CONFIG_DIR, path_or_name.removesuffix('.py') + '.py')
  if os.path.isfile(candidate):
    return candidate
  names = sorted(f[:-3] for f in os.listdir(_CONFIG_DIR)
                 if f.endswith('.py') and not f.startswith('_')) if os.path.isdir(_CONFIG_DIR) else []
  raise ConfigError(f'config {path_or_name!r} is neither a file nor one of: {", ".join(names)}')


def load_config(path_or_name: str, overrides: Mapping[str, Any] | None = None
                ) -> ml_collections.ConfigDict:
  """Loads ``get_config()`` from a file (or ``configs/<name>.py``) and applies overrides.

  Args:
    path_or_name: a path to a config file, or a name such as ``'fcn8s'``,
      optionally with ``:ARG`` passed to ``get_config(ARG)`` (``'pspnet:ade20k'``).
    overrides: dotted keys to new values, e.g. ``{'model.name': 'fcn16s'}``.

  Returns:
    The locked config (adding a key is an error), validated.
  """
  path_or_name, arg = _split_arg(path_or_name)
  path = _resolve(path_or_name)
  spec = importlib.util.spec_from_file_location(
      f'semseg_jax_config_{abs(hash(os.path.abspath(path)))}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config() if arg is None else module.get_config(arg)
  config.lock()
  for key, value in (overrides or {}).items():
    set_value(config, key, value)
  validate_config(config)
  return config


def set_value(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """``config.<key> = value`` with errors that name the key."""
  *parents, leaf = key.split('.')
  node = config
  for i, part in enumerate(parents):
    if part not in node:
      raise ConfigError(f'unknown config key {".".join(parents[:i + 1])!r}')
    node = node[part]
  if leaf not in node:
    raise ConfigError(f'unknown config key {key!r}')
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f'config.{key}={value!r}: {e}') from None


def _get(config, key):
  node = config
  for part in key.split('.'):
    node = node[part]
  return node


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises :class:`ConfigError` naming the first key with an impossible value."""
  for key, choices in _CHOICES.items():
    try:
      value = _get(config, key)
    except KeyError:
      raise ConfigError(f'config has no key {key!r}: base configs on configs/default.py') from None
    if value not in choices:
      raise ConfigError(f'config.{key}={value!r} must be one of {", ".join(choices)}')
  for key in _POSITIVE:
    value = _get(config, key)
    if not isinstance(value, int) or value <= 0:
      raise ConfigError(f'config.{key}={value!r} must be a positive integer')
  if config.batch_size % _process_count():
    raise ConfigError(f'config.batch_size={config.batch_size} must be a multiple of the '
                      f'{_process_count()} processes')
  weights = config.loss.class_weights
  if weights is not None and len(weights) != config.num_classes:
    raise ConfigError(f'config.loss.class_weights has {len(weights)} entries, '
                      f'config.num_classes={config.num_classes}')
  boundaries = tuple(config.schedule.boundaries)
  if any(b2 <= b1 for b1, b2 in zip(boundaries, boundaries[1:])) or any(b <= 0 for b in boundaries):
    raise ConfigError(f'config.schedule.boundaries={boundaries} must be increasing positive steps')
  if config.optimizer.learning_rate <= 0:
    raise ConfigError(f'config.optimizer.learning_rate={config.optimizer.learning_rate} '
                      'must be positive')
  from semseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top (imports grain)
  try:
    pipeline.validate_dataset_config(config.dataset)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _process_count() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count()
