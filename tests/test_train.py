"""The training loop: schedules, 1-vs-8-device equality, resume equality, outputs."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest

from semseg_jax import checkpoint as ckpt
from semseg_jax import config as config_lib
from semseg_jax import sharding
from semseg_jax import train
from testing_utils import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_poly_schedule_with_warmup_matches_formula():
  config = tiny_config(**{'num_train_steps': 100, 'schedule.name': 'poly',
                          'schedule.warmup_steps': 10, 'schedule.power': 0.9,
                          'optimizer.learning_rate': 0.1})
  lr = train.create_learning_rate_fn(config)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(5)), 0.05, rtol=1e-6)
  np.testing.assert_allclose(float(lr(10)), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(lr(55)), 0.1 * (1 - 45 / 90) ** 0.9, rtol=1e-5)
  np.testing.assert_allclose(float(lr(100)), 0.0, atol=1e-9)


def test_cosine_schedule_ends_at_end_factor():
  config = tiny_config(**{'num_train_steps': 50, 'schedule.name': 'cosine',
                          'schedule.end_lr_factor': 0.1, 'optimizer.learning_rate': 1.0})
  lr = train.create_learning_rate_fn(config)
  np.testing.assert_allclose(float(lr(25)), 0.1 + 0.9 * 0.5, rtol=1e-5)
  np.testing.assert_allclose(float(lr(50)), 0.1, rtol=1e-5)


def test_step_and_exponential_schedules():
  config = tiny_config(**{'num_train_steps': 100, 'schedule.name': 'step',
                          'schedule.boundaries': (30, 60), 'schedule.decay_factor': 0.1,
                          'optimizer.learning_rate': 1.0})
  lr = train.create_learning_rate_fn(config)
  np.testing.assert_allclose([float(lr(s)) for s in (0, 29, 30, 59, 60, 99)],
                             [1, 1, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)
  config = tiny_config(**{'schedule.name': 'exponential', 'schedule.decay_steps': 10,
                          'schedule.decay_factor': 0.5, 'optimizer.learning_rate': 1.0})
  np.testing.assert_allclose(float(train.create_learning_rate_fn(config)(15)), 0.5 ** 1.5,
                             rtol=1e-6)


def test_rmsprop_matches_pytorch_update():
  # torch.optim.RMSprop(alpha=0.99, eps=1e-8), first step: g / (sqrt(0.01 g^2) + eps).
  config = tiny_config(**{'optimizer.name': 'rmsprop', 'optimizer.momentum': 0.0,
                          'optimizer.weight_decay': 0.0, 'optimizer.learning_rate': 0.1,
                          'schedule.name': 'constant'})
  tx = train.create_optimizer(config, train.create_learning_rate_fn(config))
  g = np.array([0.5, -2.0], np.float32)
  updates, _ = tx.update({'w': g}, tx.init({'w': np.zeros(2, np.float32)}))
  np.testing.assert_allclose(updates['w'], -0.1 * g / (np.sqrt(0.01 * g * g) + 1e-8),
                             rtol=1e-5)


@pytest.mark.parametrize('name', ['sgd', 'adam', 'adamw', 'rmsprop'])
def test_optimizers_build_and_clip(name):
  config = tiny_config(**{'optimizer.name': name, 'optimizer.grad_clip_norm': 1.0})
  tx = train.create_optimizer(config, train.create_learning_rate_fn(config))
  params = {'w': np.ones(3, np.float32)}
  updates, _ = tx.update({'w': np.full(3, 100.0, np.float32)}, tx.init(params), params)
  assert np.all(np.isfinite(updates['w']))
  assert optax.tree.norm(updates) < 1.0  # lr <= 0.01 after clipping to norm 1.


def test_one_step_on_8_devices_equals_1_device():
  script = textwrap.dedent('''
      import os, sys
      os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
      os.environ['JAX_PLATFORMS'] = 'cpu'  # Simulated devices, also on a GPU machine.
      sys.path.insert(0, sys.argv[1]); sys.path.insert(0, os.path.join(sys.argv[1], 'tests'))
      import jax, numpy as np
      assert jax.device_count() == 8
      from testing_utils import tiny_config
      from semseg_jax import sharding, train
      from semseg_jax.data import pipeline
      from semseg_jax import data as data_lib
      config = tiny_config(**{'batch_size': 8, 'optimizer.name': 'sgd'})
      source = data_lib.get_source(config.dataset, 'train', data_dir=None)
      batch = next(pipeline.make_train_iterator(source, config.dataset, seed=0, batch_size=8,
                                                process_index=0, process_count=1))
      batch = {'image': batch['image'], 'label': batch['label']}
      results = []
      for devices in (jax.devices()[:1], jax.devices()):
        mesh = sharding.create_mesh(devices)
        model = train.create_model(config)
        state = train.create_train_state(config, model, mesh)
        step = train.make_train_step(config, mesh, jax.tree.map(lambda x: x.sharding, state))
        for _ in range(2):
          state, metrics = step(state, sharding.make_global_batch(batch, mesh),
                                jax.random.key(0))
        results.append((float(metrics['loss']), jax.device_get(state.params),
                        jax.device_get(state.batch_stats)))
      (l1, p1, b1), (l8, p8, b8) = results
      print('losses', l1, l8)
      np.testing.assert_allclose(l1, l8, rtol=1e-5)
      for a, b in zip(jax.tree.leaves((p1, b1)), jax.tree.leaves((p8, b8))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
      print('OK', len(jax.tree.leaves(p1)))
  ''')
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  result = subprocess.run([sys.executable, '-c', script, ROOT], capture_output=True, text=True,
                          env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'OK' in result.stdout


def _final_variables(config, workdir):
  _, variables, step = train.restore_variables(config, workdir, 'latest')
  return jax.device_get(variables), step


def test_resume_gives_the_same_parameters(tmp_path):
  config = tiny_config()
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  train.train_and_evaluate(config, straight)
  train.train_and_evaluate(config, resumed, stop_after=4)
  # A second interruption in the same workdir before finishing.
  assert _final_variables(config, resumed)[1] == 4
  train.train_and_evaluate(config, resumed)
  (a, step_a), (b, step_b) = _final_variables(config, straight), _final_variables(config, resumed)
  assert step_a == step_b == config.num_train_steps
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
  # The resumed run's log holds each logged step once, like the straight one.
  def logged(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      return [json.loads(l)['step'] for l in f]
  assert logged(resumed) == logged(straight) == [2, 3, 4, 6]


def test_training_writes_metrics_events_checkpoints_and_predictions(tmp_path):
  config = tiny_config()
  workdir = str(tmp_path)
  scores = train.train_and_evaluate(config, workdir)
  assert set(scores) >= {'mean_iou', 'pixel_acc', 'mean_acc', 'fw_iou', 'per_class_iou'}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(l) for l in f]
  last = records[-1]
  assert last['step'] == 6
  for key in ('train/loss', 'train/lr', 'train/steps_per_sec', 'val/mean_iou'):
    assert key in last, key
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))
  assert os.path.exists(os.path.join(workdir, 'config.json'))
  assert os.listdir(os.path.join(workdir, 'predictions'))
  manager = ckpt.create_manager(workdir, read_only=True)
  # Latest keep_checkpoints=3 of {2, 3, 4, 6} plus the best-mIoU one.
  assert manager.latest_step() == 6
  assert sorted(manager.all_steps()) == [3, 4, 6]
  assert manager.best_step() in (3, 6)
  assert manager.metrics(manager.best_step())['mean_iou'] == max(
      r['val/mean_iou'] for r in records if 'val/mean_iou' in r)


def test_restoring_another_class_count_names_the_parameter(tmp_path):
  config = tiny_config(num_train_steps=2, eval_every_steps=2)
  train.train_and_evaluate(config, str(tmp_path))
  other = tiny_config(num_classes=7)
  with pytest.raises(ValueError, match=r'parameter .*(kernel|bias).* has shape'):
    train.restore_variables(other, str(tmp_path))


def test_num_classes_must_match_the_dataset(tmp_path):
  with pytest.raises(config_lib.ConfigError, match='num_classes'):
    train.train_and_evaluate(tiny_config(num_classes=9), str(tmp_path))


def test_batch_not_divisible_by_devices_is_an_error():
  mesh = sharding.create_mesh()
  with pytest.raises(ValueError, match='config.batch_size=0'):
    sharding.check_batch_size(0, mesh)


def test_a_non_finite_step_changes_nothing():
  config = tiny_config()
  mesh = sharding.create_mesh(jax.devices()[:1])
  state = train.create_train_state(config, train.create_model(config), mesh)
  step = train.make_train_step(config, mesh, jax.tree.map(lambda x: x.sharding, state))
  before = jax.device_get(state)
  rng = np.random.default_rng(0)
  image = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
  label = rng.integers(0, 6, size=(4, 32, 32)).astype(np.int32)
  bad = sharding.make_global_batch({'image': np.where(image > 2, np.inf, image), 'label': label},
                                   mesh)
  state, metrics = step(state, bad, jax.random.key(0))
  assert float(metrics['skipped']) == 1.0 and not np.isfinite(float(metrics['loss']))
  for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(before)):
    assert np.array_equal(a, b)
  good = sharding.make_global_batch({'image': image, 'label': label}, mesh)
  state, metrics = step(state, good, jax.random.key(0))
  assert float(metrics['skipped']) == 0.0 and int(state.step) == 1
  assert not np.array_equal(jax.device_get(state.params['final']['kernel']),
                            before.params['final']['kernel'])
