"""Every config file loads and validates; bad keys and values name themselves."""
import glob
import json
import os
import types

import ml_collections
import numpy as np
import pytest

from semseg_jax import config as config_lib
from semseg_jax import sharding

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(CONFIG_DIR, '*.py'))
                      if not os.path.basename(p).startswith('_'))


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_every_config_loads_validates_and_builds_its_model(path):
  config = config_lib.load_config(path)
  from semseg_jax import train  # The model must accept every config.model option.
  model = train.create_model(config)
  assert model.num_classes == config.num_classes


def test_load_by_name_and_override():
  config = config_lib.load_config('fcn16s', {'batch_size': 2, 'model.name': 'fcn32s'})
  assert config.batch_size == 2 and config.model.name == 'fcn32s'


@pytest.mark.parametrize('key,value,match', [
    ('nope', 1, "unknown config key 'nope'"),
    ('optimizer.nope', 1, "unknown config key 'optimizer.nope'"),
    ('batch_size', 'eight', 'config.batch_size'),
    ('optimizer.name', 'lamb', 'config.optimizer.name'),
    ('dtype', 'float16', 'config.dtype'),
    ('num_train_steps', 0, 'config.num_train_steps'),
    ('loss.class_weights', (1.0, 2.0), 'config.loss.class_weights'),
])
def test_bad_overrides_name_the_key(key, value, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.load_config('quickstart', {key: value})


def test_unknown_config_name_lists_the_choices():
  with pytest.raises(config_lib.ConfigError, match='quickstart'):
    config_lib.load_config('no_such_config')


@pytest.mark.parametrize('name,model', [('pspnet:ade20k', 'pspnet'), ('frrn:A', 'frrnA'),
                                        ('deeplabv3plus:cityscapes', 'deeplabv3plus')])
def test_config_arguments_like_ml_collections_flags(name, model):
  config = config_lib.load_config(name)
  assert config.model.name == model


def test_dataset_values_are_checked_with_the_config():
  with pytest.raises(config_lib.ConfigError, match='dataset.scale_range'):
    config_lib.load_config('quickstart', {'dataset.scale_range': (2.0, 1.0)})


# ------------------------------------------------- issue #7: every bad input names its key


def _write(tmp_path, body):
  path = tmp_path / 'my_config.py'
  path.write_text('from configs import default\n\ndef get_config():\n'
                  '  config = default.get_config()\n' + body + '  return config\n')
  return str(path)


def test_unknown_key_in_a_config_file_is_named(tmp_path):
  path = _write(tmp_path, '  config.batch_sise = 4\n  config.optimizer.momentun = 0.5\n')
  with pytest.raises(config_lib.ConfigError, match="unknown config key 'batch_sise'"):
    config_lib.load_config(path)
  path = _write(tmp_path, '  config.optimizer.momentun = 0.5\n')
  with pytest.raises(config_lib.ConfigError, match="'optimizer.momentun'"):
    config_lib.load_config(path)


@pytest.mark.parametrize('body,match', [
    ('  config.optimizer.momentum = "high"\n', "field 'momentum'"),
    ('  del config["seed"]\n', "config has no key 'seed'"),
    ('  config.model.name = "fcn9s"\n', "config.model.name='fcn9s' is not a network"),
    ('  raise KeyError("boom")\n', r'get_config\(\) failed \(KeyError'),
])
def test_bad_config_file_is_one_line_naming_file_and_key(tmp_path, body, match):
  path = _write(tmp_path, body)
  with pytest.raises(config_lib.ConfigError, match=match) as info:
    config_lib.load_config(path)
  assert '\n' not in str(info.value)
  if 'get_config() failed' in str(info.value):
    assert path in str(info.value)


@pytest.mark.parametrize('text,match', [
    ('def get_config(:\n', 'cannot run it .SyntaxError'),
    ('x = 1\n', 'defines no get_config'),
    ('def get_config():\n  return {}\n', 'returned dict, not an ml_collections.ConfigDict'),
])
def test_broken_config_file_names_the_file(tmp_path, text, match):
  path = tmp_path / 'broken.py'
  path.write_text(text)
  with pytest.raises(config_lib.ConfigError, match=match) as info:
    config_lib.load_config(str(path))
  assert str(path) in str(info.value)


@pytest.mark.parametrize('key,value,match', [
    ('batch_size', '8', "config.batch_size='8' must be an int"),
    ('batch_size', True, 'config.batch_size=True must be an int'),
    ('optimizer.learning_rate', 'fast', 'config.optimizer.learning_rate'),
    ('optimizer.learning_rate', float('nan'), 'config.optimizer.learning_rate'),
    ('dataset.hflip', 'yes', 'dataset.hflip'),
    ('remat', 1, 'config.remat=1 must be a bool'),
    ('init_from', 3, 'config.init_from=3 must be a str'),
    ('schedule.boundaries', ['10', '20'], 'config.schedule.boundaries'),
])
def test_wrong_types_in_an_unchecked_config_are_named(key, value, match):
  # A config read back from config.json is a plain ConfigDict: ml_collections'
  # own type checks are gone, validate_config must catch them.
  config = config_lib.load_config('quickstart').to_dict()
  node = config
  *parents, leaf = key.split('.')
  for part in parents:
    node = node[part]
  node[leaf] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate_config(ml_collections.ConfigDict(config))


def test_json_round_trip_validates():
  config = config_lib.load_config('quickstart')
  config_lib.validate_config(ml_collections.ConfigDict(json.loads(config.to_json())))


@pytest.mark.parametrize('key,value,match', [
    ('nan_policy', 'ignore', "config.nan_policy='ignore' must be one of raise, skip"),
    ('preemption_timeout_secs', 0, 'config.preemption_timeout_secs=0 must be positive'),
    ('preemption_timeout_secs', -5, 'config.preemption_timeout_secs'),
    ('init_from', '', "config.init_from='' must be None"),
    ('eval.mode', 'tiles', 'config.eval.mode'),
    ('eval.scales', (0.0,), 'config.eval.scales'),
    ('model.name', 'segnet2', "config.model.name='segnet2'"),
    ('loss.ignore_index', 3, 'config.loss.ignore_index=3'),
    ('loss.aux_weights', (-1.0,), 'config.loss.aux_weights'),
])
def test_new_keys_are_validated(key, value, match):
  from semseg_jax import evaluate  # pylint: disable=g-import-not-at-top
  if key.startswith('eval.') and not hasattr(evaluate, 'validate_eval_config'):
    pytest.skip('evaluate.validate_eval_config has not landed yet')
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.load_config('quickstart', {key: value})


def test_valid_values_of_the_new_keys_load():
  config = config_lib.load_config('quickstart', {
      'nan_policy': 'skip', 'preemption_timeout_secs': 5, 'remat': True,
      'init_from': '/tmp/some_run'})
  assert config.nan_policy == 'skip' and config.remat


def test_batch_not_divisible_by_devices_names_the_key():
  four_devices = types.SimpleNamespace(devices=np.zeros(4))
  assert sharding.check_batch_size(8, four_devices) == 8  # One process.
  for bad in (6, 0, -4, 2.0):
    with pytest.raises(config_lib.ConfigError, match=rf'config.eval_batch_size={bad!r} must '
                       'be a positive multiple of the 4 devices'):
      sharding.check_batch_size(bad, four_devices, 'eval_batch_size')


def test_num_classes_must_match_the_dataset():
  from semseg_jax import train  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config('quickstart', {'num_classes': 5})
  with pytest.raises(config_lib.ConfigError,
                     match="config.num_classes=5 but dataset 'shapes' has 6 classes"):
    train.check_dataset(config)


def test_aux_weights_must_match_the_model_outputs():
  config = config_lib.load_config('quickstart', {'loss.aux_weights': (0.4,),
                                                 'dataset.image_size': (32, 32)})
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.loss.aux_weights=\(0.4,\) has 1 weights but model 'unet' "
                           'has 0 auxiliary outputs'):
    config_lib.check_model_config(config)
  config = config_lib.load_config('quickstart', {'dataset.image_size': (32, 32)})
  assert config_lib.check_model_config(config) == 0


def test_aux_weights_of_a_network_with_aux_outputs():
  # PSPNet at 1/8 width with one block per stage: the same aux head, a cheap trace.
  config = config_lib.load_config('pspnet', {'model.block_config': (1, 1, 1, 1),
                                             'model.width_mult': 0.125,
                                             'dataset.image_size': (64, 64)})
  assert len(config.loss.aux_weights) == config_lib.check_model_config(config) == 1
  config.loss.aux_weights = ()
  with pytest.raises(config_lib.ConfigError, match="model 'pspnet' has 1 auxiliary outputs"):
    config_lib.check_model_config(config)


def test_eval_pad_size_smaller_than_the_resize_without_shrinking():
  config = config_lib.load_config('quickstart')
  if 'resize' not in config.dataset:
    pytest.skip('this dataset section has no resize / eval_pad_size keys yet')
  overrides = {'dataset.resize': (96, 128), 'dataset.eval_pad_size': (96, 96)}
  with pytest.raises(config_lib.ConfigError, match='config.dataset.eval_pad_size'):
    config_lib.load_config('quickstart', overrides)
  config_lib.load_config('quickstart', {**overrides, 'dataset.eval_shrink_to_fit': True})
