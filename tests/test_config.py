"""Every config file loads and validates; bad keys and values name themselves."""
import glob
import os

import pytest

from semseg_jax import config as config_lib

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
