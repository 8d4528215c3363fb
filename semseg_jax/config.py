"""Loading and checking ml_collections configs.

A config file is a Python file with ``get_config() -> ConfigDict`` (see
``configs/default.py``). :func:`load_config` accepts a path or the name of a
file in ``configs/`` and applies dotted overrides; :func:`validate_config`
rejects impossible values with an error that names the key.
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Any, Mapping

import ml_collections
import numpy as np

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')

_CHOICES = {
    'dtype': ('float32', 'bfloat16'),
    'optimizer.name': ('sgd', 'adam', 'adamw', 'rmsprop'),
    'schedule.name': ('poly', 'cosine', 'step', 'exponential', 'constant'),
    'loss.name': ('cross_entropy', 'bootstrapped_cross_entropy'),
    'eval_checkpoint': ('latest', 'best'),
    'nan_policy': ('raise', 'skip'),
}
_POSITIVE = ('num_classes', 'batch_size', 'eval_batch_size', 'num_train_steps',
             'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
             'keep_checkpoints')


# Sections whose keys are checked elsewhere: model options by the network's
# constructor, dataset options by data.pipeline, eval options by evaluate.
_FREE_SECTIONS = ('model', 'dataset', 'eval')


class ConfigError(ValueError):
  """A config key is unknown, has the wrong type or an impossible value.

  The message names the key (``config.<dotted.key>=<value>``) and is one line.
  """


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
  names = []
  if os.path.isdir(_CONFIG_DIR):
    names = sorted(f[:-3] for f in os.listdir(_CONFIG_DIR)
                   if f.endswith('.py') and not f.startswith('_'))
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
  config = _run_config_file(path, arg)
  config.lock()
  for key, value in (overrides or {}).items():
    set_value(config, key, value)
  validate_config(config)
  return config


def _run_config_file(path: str, arg: str | None) -> ml_collections.ConfigDict:
  """Executes a config file (config files are Python, by design) and calls ``get_config``.

  Any failure (a syntax error, a missing ``get_config``, an exception inside
  it, a return value that is not a ConfigDict) is a ConfigError naming the file;
  the original exception stays chained for the traceback.
  """
  spec = importlib.util.spec_from_file_location(
      f'semseg_jax_config_{abs(hash(os.path.abspath(path)))}', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f'config file {path}: cannot run it ({_one_line(e)})') from e
  if not callable(getattr(module, 'get_config', None)):
    raise ConfigError(f'config file {path} defines no get_config() function')
  try:
    config = module.get_config() if arg is None else module.get_config(arg)
  except Exception as e:  # pylint: disable=broad-except
    call = 'get_config()' if arg is None else f'get_config({arg!r})'
    raise ConfigError(f'config file {path}: {call} failed ({_one_line(e)})') from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'config file {path}: get_config() returned {type(config).__name__}, '
                      'not an ml_collections.ConfigDict')
  return config


def _one_line(e: BaseException) -> str:
  text = ' '.join(str(e).split())
  return f'{type(e).__name__}: {text}' if text else type(e).__name__


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
    raise ConfigError(f'config.{key}={value!r}: {" ".join(str(e).split())}') from None


def _get(config, key):
  node = config
  for part in key.split('.'):
    node = node[part]
  return node


_REFERENCE: ml_collections.ConfigDict | None = None


def _reference() -> ml_collections.ConfigDict:
  """``configs/default.py``'s config: the one list of keys and their types."""
  global _REFERENCE
  if _REFERENCE is None:
    spec = importlib.util.spec_from_file_location('semseg_jax_config_reference',
                                                  os.path.join(_CONFIG_DIR, 'default.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _REFERENCE = module.get_config()
  return _REFERENCE


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _type_ok(value: Any, kind: type) -> bool:
  """Whether ``value`` may stand where the default config has a ``kind`` (JSON-tolerant)."""
  if value is None:
    return True  # None is checked by the key's own rule (placeholders, optional values).
  if kind is bool:
    return isinstance(value, (bool, np.bool_))
  if kind is int:
    return _is_int(value)
  if kind is float:
    return (_is_int(value) or isinstance(value, (float, np.floating))) and math.isfinite(value)
  if kind is tuple:
    return isinstance(value, (tuple, list))  # config.json stores tuples as lists.
  return isinstance(value, kind)


def _check_keys_and_types(config: Any, reference: ml_collections.ConfigDict,
                          prefix: str = '') -> None:
  """Every key of ``reference`` is present with a value of its type; no other key exists."""
  keys = set(config.keys())
  for key in sorted(keys - set(reference.keys())):
    raise ConfigError(f'unknown config key {prefix + key!r} (not in configs/default.py)')
  for key in reference.keys():
    name = prefix + key
    if key not in keys:
      raise ConfigError(f'config has no key {name!r}: base configs on configs/default.py')
    value, default = config[key], reference[key]
    if isinstance(default, ml_collections.ConfigDict):
      if not hasattr(value, 'keys'):
        raise ConfigError(f'config.{name}={value!r} must be a section (ConfigDict)')
      if name not in _FREE_SECTIONS:
        _check_keys_and_types(value, default, name + '.')
      continue
    kind = reference.get_ref(key).get_type() if default is None else type(default)
    if not _type_ok(value, kind):
      raise ConfigError(f'config.{name}={value!r} must be {"a" if kind is not int else "an"} '
                        f'{kind.__name__}')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises :class:`ConfigError` naming the first key with an impossible value.

  Checks: every key is one of ``configs/default.py`` (except free sections
  ``model``, ``dataset`` and ``eval``, which their own validators check), has
  its type, and a possible value; the combinations the trainer relies on
  (class weights per class, global batch per process, eval pad size against
  the resize) hold. Model-dependent checks (aux weights) are in
  :func:`check_model_config`; device-count checks in
  ``sharding.check_batch_size``.
  """
  _check_keys_and_types(config, _reference())
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
  processes = _process_count()
  if config.batch_size % processes:
    raise ConfigError(f'config.batch_size={config.batch_size} must be a multiple of the '
                      f'{processes} processes')
  weights = config.loss.class_weights
  if weights is not None and len(weights) != config.num_classes:
    raise ConfigError(f'config.loss.class_weights has {len(weights)} entries, '
                      f'config.num_classes={config.num_classes}')
  boundaries = tuple(config.schedule.boundaries)
  if (not all(_is_int(b) for b in boundaries) or any(b <= 0 for b in boundaries)
      or any(b2 <= b1 for b1, b2 in zip(boundaries, boundaries[1:]))):
    raise ConfigError(f'config.schedule.boundaries={boundaries} must be increasing positive steps')
  if config.optimizer.learning_rate <= 0:
    raise ConfigError(f'config.optimizer.learning_rate={config.optimizer.learning_rate} '
                      'must be positive')
  for key in ('aux_weights', 'class_weights'):
    values = config.loss[key]
    if values is not None and not all(
        _type_ok(v, float) and not isinstance(v, bool) and v >= 0 for v in values):
      raise ConfigError(f'config.loss.{key}={tuple(values)!r} must be non-negative numbers')
  if not 0 <= config.loss.ignore_index <= 255 or config.loss.ignore_index < config.num_classes:
    raise ConfigError(f'config.loss.ignore_index={config.loss.ignore_index} must be a label '
                      f'value in [num_classes={config.num_classes}, 255] (labels are uint8)')
  if config.preemption_timeout_secs <= 0:
    raise ConfigError(f'config.preemption_timeout_secs={config.preemption_timeout_secs!r} '
                      'must be positive')
  if config.init_from is not None and not config.init_from:
    raise ConfigError("config.init_from='' must be None or a workdir/checkpoint path")
  from semseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top (imports grain)
  try:
    pipeline.validate_dataset_config(config.dataset)
  except (TypeError, ValueError) as e:
    raise ConfigError(_prefixed(e, 'dataset')) from None
  _check_eval_pad_size(config.dataset)
  from semseg_jax import evaluate  # pylint: disable=g-import-not-at-top (imports jax)
  if hasattr(evaluate, 'validate_eval_config'):
    try:
      evaluate.validate_eval_config(config)  # Raises ConfigError naming config.eval.<key>.
    except ConfigError:
      raise
    except (TypeError, ValueError) as e:
      raise ConfigError(_prefixed(e, 'eval')) from None
  from semseg_jax import models  # pylint: disable=g-import-not-at-top (imports flax)
  if not isinstance(config.model.get('name'), str):
    raise ConfigError(f'config.model.name={config.model.get("name")!r} must be a network name')
  if config.model.name not in models.list_models():
    raise ConfigError(f'config.model.name={config.model.name!r} is not a network; known: '
                      f'{", ".join(models.list_models())}')


def _prefixed(e: BaseException, section: str) -> str:
  """One line naming the section (validators that name the key already keep their text)."""
  text = ' '.join(str(e).split())
  return text if f'{section}.' in text else f'config.{section}: {type(e).__name__}: {text}'


def _check_eval_pad_size(dataset: Any) -> None:
  """Resized eval images that cannot fit the eval pad size when shrinking is off."""
  if not all(k in dataset for k in ('resize', 'eval_pad_size', 'eval_shrink_to_fit')):
    return  # An older dataset section: nothing to compare.
  resize, pad = dataset.resize, dataset.eval_pad_size
  if resize is None or pad is None or dataset.eval_shrink_to_fit:
    return
  if resize[0] > pad[0] or resize[1] > pad[1]:
    raise ConfigError(f'config.dataset.eval_pad_size={tuple(pad)} is smaller than '
                      f'config.dataset.resize={tuple(resize)} with eval_shrink_to_fit=False: '
                      'every eval image would be rejected; enlarge eval_pad_size')


def check_model_config(config: ml_collections.ConfigDict, model: Any = None) -> int:
  """Checks the config against the network it builds; returns its number of aux outputs.

  Shapes only (``jax.eval_shape`` of a train-mode forward pass on one
  ``dataset.image_size`` image): costs a trace, no compute.

  Raises:
    ConfigError: ``config.loss.aux_weights`` does not have one weight per
      auxiliary output, or the network rejects the input size.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if model is None:
    from semseg_jax import train  # pylint: disable=g-import-not-at-top
    model = train.create_model(config)
  h, w = config.dataset.image_size
  x = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  key = jax.random.key(0, impl='rbg')

  def forward(x):
    variables = model.init({'params': key, 'dropout': key}, x, train=False)
    output, _ = model.apply(variables, x, train=True, rngs={'dropout': key},
                            mutable=['batch_stats'])
    return output

  try:
    output = jax.eval_shape(forward, x)
  except (ValueError, TypeError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f'config.model.name={config.model.name!r} rejects '
                      f'config.dataset.image_size={tuple(config.dataset.image_size)}: '
                      f'{first}') from None
  num_aux = len(output.aux)
  weights = tuple(config.loss.aux_weights)
  if len(weights) != num_aux:
    raise ConfigError(f'config.loss.aux_weights={weights} has {len(weights)} weights but '
                      f'model {config.model.name!r} has {num_aux} auxiliary outputs')
  return num_aux


def _process_count() -> int:
  """Processes in the job, without starting a device backend.

  Asking ``jax.process_count()`` before ``jax.distributed.initialize`` would
  start the backend and make that initialisation fail, so a config loaded
  before joining a job counts 1 process; the trainer checks the batch against
  the real mesh again (``sharding.check_batch_size``).
  """
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count() if jax.distributed.is_initialized() else 1
