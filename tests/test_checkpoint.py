"""Checkpoint helpers: committed steps, locating a checkpoint, pretrained init (config.init_from)."""
import os

import jax
import numpy as np
import pytest

from semseg_jax import checkpoint as ckpt
from semseg_jax import config as config_lib
from semseg_jax import sharding
from semseg_jax import train
from testing_utils import tiny_config


def _tree():
  rng = np.random.default_rng(0)
  return {
      'params': {'backbone': {'conv': {'kernel': rng.normal(size=(3, 3, 3, 4)).astype(np.float32),
                                       'bias': np.zeros(4, np.float32)}},
                 'head': {'kernel': rng.normal(size=(1, 1, 4, 6)).astype(np.float32)}},
      'batch_stats': {'backbone': {'bn': {'mean': np.zeros(4, np.float32)}}},
  }


def _write(workdir, tree, step=0):
  manager = ckpt.create_manager(str(workdir))
  ckpt.save(manager, step, tree)
  assert ckpt.wait(manager)
  manager.close()


def test_merge_loads_matching_paths_and_keeps_the_rest():
  target = _tree()
  source = {'params': {'backbone': {'conv': {'kernel': np.ones((3, 3, 3, 4), np.float64)}},
                       'unrelated': {'w': np.ones(2, np.float32)}}}
  merged, counts = ckpt.merge_variables(target, source, 'src')
  assert counts == {'loaded': 1, 'kept': 3, 'unused': 1}
  kernel = merged['params']['backbone']['conv']['kernel']
  assert kernel.dtype == np.float32 and np.array_equal(kernel, np.ones((3, 3, 3, 4)))
  assert np.array_equal(merged['params']['head']['kernel'], target['params']['head']['kernel'])


def test_merge_names_a_parameter_with_another_shape():
  source = _tree()
  source['params']['head']['kernel'] = np.zeros((1, 1, 4, 21), np.float32)
  with pytest.raises(ValueError, match=r'parameter params/head/kernel has shape \(1, 1, 4, 21\), '
                     r'the model expects \(1, 1, 4, 6\)'):
    ckpt.merge_variables(_tree(), source, 'src')


def test_merge_with_nothing_in_common_is_an_error():
  with pytest.raises(ValueError, match='no parameter matches the model'):
    ckpt.merge_variables(_tree(), {'params': {'fc': {'w': np.ones(3)}}}, 'src')


def test_resolve_accepts_workdir_checkpoints_dir_and_step_dir(tmp_path):
  _write(tmp_path, _tree(), step=0)
  _write(tmp_path, _tree(), step=7)
  root = str(tmp_path)
  assert ckpt.resolve(root) == (root, 7)
  assert ckpt.resolve(os.path.join(root, 'checkpoints')) == (root, 7)
  assert ckpt.resolve(os.path.join(root, 'checkpoints', '0')) == (root, 0)
  for bad in (str(tmp_path / 'none'), os.path.join(root, 'checkpoints', '3')):
    with pytest.raises(FileNotFoundError, match='holds no committed checkpoint'):
      ckpt.resolve(bad)
  # A half-written step (Orbax's temporary name) is not a checkpoint.
  os.makedirs(os.path.join(root, 'checkpoints', '9.orbax-checkpoint-tmp-1'))
  assert ckpt.resolve(root) == (root, 7)
  assert ckpt.committed_steps(ckpt.create_manager(root, read_only=True)) == [0, 7]


def test_load_variables_reads_any_tree(tmp_path):
  tree = _tree()
  tree['opt_state'] = {'mu': np.ones(5, np.float32)}  # Another optimizer: read and dropped.
  _write(tmp_path, tree)
  variables, where = ckpt.load_variables(str(tmp_path))
  assert where.endswith(os.path.join('checkpoints', '0'))
  assert set(variables) == {'params', 'batch_stats'}
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(
      {'params': _tree()['params'], 'batch_stats': _tree()['batch_stats']})):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_init_from_loads_backbone_only_weights(tmp_path):
  mesh = sharding.create_mesh(jax.devices()[:1])
  config = tiny_config()
  model = train.create_model(config)
  pretrained = jax.device_get(train.create_train_state(config, model, mesh))
  # "Backbone-only" weights: everything but the final classifier.
  params = {k: v for k, v in pretrained.params.items() if k != 'final'}
  _write(tmp_path / 'src', {'params': params, 'batch_stats': pretrained.batch_stats})
  fresh = train.create_train_state(tiny_config(seed=1), model, mesh)
  state = train.init_from_checkpoint(fresh, str(tmp_path / 'src'))
  assert int(state.step) == 0
  for name in pretrained.params:
    want = fresh.params[name] if name == 'final' else pretrained.params[name]
    for a, b in zip(jax.tree.leaves(state.params[name]), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(state.batch_stats), jax.tree.leaves(pretrained.batch_stats)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The same weights for 7 classes: the classifier's shape is named.
  _write(tmp_path / 'full', {'params': pretrained.params})
  other = tiny_config(num_classes=7)
  with pytest.raises(config_lib.ConfigError, match=r'config.init_from: .* parameter '
                     r'params/final/(kernel|bias) has shape'):
    train.init_from_checkpoint(
        train.create_train_state(other, train.create_model(other), mesh), str(tmp_path / 'full'))
