"""Faults: kill -9, SIGTERM, NaN/Inf, unwritable or full disk, failed saves (issue #7).

Every interrupted run is compared with one run that never stopped (the
``straight`` fixture): the final TrainState (params, optimizer state,
BatchNorm statistics, step) must be bitwise equal, and metrics.jsonl equal
except for its timing fields (``train.TIMING_KEYS``).

Killed runs are subprocesses of a small driver that slows every step down by
``_STEP_DELAY`` seconds, so that a signal sent when the first checkpoint
commits lands while steps remain.
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from semseg_jax import checkpoint as ckpt
from semseg_jax import config as config_lib
from semseg_jax import sharding
from semseg_jax import train
from testing_utils import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tiny_config: 6 steps, log every 2, eval every 3, checkpoints at 2, 3, 4, 6.
# Step 3 is an evaluation but not a log step, so resuming from it needs the
# per-step metrics that the checkpoint carries to log step 4 like a straight run.
_STEP_DELAY = 0.4

_DRIVER = '''
import json, os, sys, time
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], 'tests')]
from testing_utils import tiny_config
from semseg_jax import train
delay = float(sys.argv[3])
model_inputs = train._model_inputs
def slow_inputs(batch):
  time.sleep(delay)
  return model_inputs(batch)
train._model_inputs = slow_inputs
if os.environ.get('TEST_SAVE_NEVER_FINISHES'):  # A save stuck on a dead file system.
  from semseg_jax import checkpoint as ckpt
  wait = ckpt.wait
  def stuck(manager, timeout_secs=None):
    if timeout_secs is None:
      return wait(manager)
    time.sleep(timeout_secs)
    return False
  ckpt.wait = stuck
train.train_and_evaluate(tiny_config(**json.loads(sys.argv[4])), sys.argv[2])
print('FINISHED')
'''


def _start(workdir, overrides=None, env=None, delay=_STEP_DELAY):
  return subprocess.Popen(
      [sys.executable, '-c', _DRIVER, ROOT, str(workdir), str(delay),
       json.dumps(overrides or {})],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, **(env or {})))


def _wait_for(predicate, proc, timeout=240.0):
  deadline = time.time() + timeout
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f'training exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}')
    if time.time() > deadline:
      proc.kill()
      raise AssertionError('timed out waiting for the training subprocess')
    time.sleep(0.05)


def _committed(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(
      directory) else []


def _final_state(config, workdir):
  """The full TrainState of the latest checkpoint, on the host."""
  mesh = sharding.create_mesh(jax.devices()[:1])
  abstract = train.create_train_state(config, train.create_model(config), mesh, abstract=True)
  manager = ckpt.create_manager(workdir, read_only=True)
  step = manager.latest_step()
  state = ckpt.restore(manager, step, abstract)
  manager.close()
  return step, jax.device_get(state)


def _records(workdir, drop=train.TIMING_KEYS):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(l).items() if k not in drop} for l in f]


def _assert_same_run(config, workdir, reference):
  step, state = _final_state(config, workdir)
  ref_step, ref_state = _final_state(config, reference)
  assert step == ref_step == config.num_train_steps
  leaves, ref_leaves = jax.tree.leaves(state), jax.tree.leaves(ref_state)
  assert len(leaves) == len(ref_leaves) > 0
  for i, (a, b) in enumerate(zip(leaves, ref_leaves)):
    assert np.array_equal(np.asarray(a), np.asarray(b)), f'leaf {i} differs'
  assert _records(workdir) == _records(reference)


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """A run that never stopped."""
  workdir = str(tmp_path_factory.mktemp('straight'))
  # The same driver as the interrupted runs, in a fresh process: nothing that
  # other tests did to this test process (jax config, caches) can tell the
  # runs apart.
  proc = _start(workdir, delay=0)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0 and 'FINISHED' in out, err[-3000:]
  assert [r['step'] for r in _records(workdir)] == [2, 3, 4, 6]
  return workdir


def test_kill9_after_first_commit_resumes_bitwise(tmp_path, straight):
  workdir = str(tmp_path / 'run')
  proc = _start(workdir)
  _wait_for(lambda: _committed(workdir), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  steps = _committed(workdir)
  assert steps and steps[-1] < 6, steps
  train.train_and_evaluate(tiny_config(), workdir)
  _assert_same_run(tiny_config(), workdir, straight)


def test_kill9_during_a_save_restores_the_last_committed(tmp_path, straight):
  workdir = str(tmp_path / 'run')
  marker = str(tmp_path / 'paused')
  # The save of step 4 stops after its files are written and before the commit.
  proc = _start(workdir, env={'SEMSEG_JAX_TEST_PAUSE_SAVE': f'4:{marker}'})
  _wait_for(lambda: os.path.exists(marker), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  directory = os.path.join(workdir, 'checkpoints')
  assert _committed(workdir) == [2, 3]
  half = [n for n in os.listdir(directory) if n.startswith('4') and not n.isdigit()]
  assert half, os.listdir(directory)  # The half-written step 4 is there ...
  train.train_and_evaluate(tiny_config(), workdir)  # ... and is never restored.
  assert not [n for n in os.listdir(directory) if not n.isdigit()]
  _assert_same_run(tiny_config(), workdir, straight)


def test_sigterm_checkpoints_exits_0_and_resumes(tmp_path, straight):
  workdir = str(tmp_path / 'run')
  proc = _start(workdir)
  _wait_for(lambda: _committed(workdir), proc)
  t0 = time.time()
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert 'FINISHED' not in out  # It stopped early ...
  assert time.time() - t0 < 60
  stopped = _committed(workdir)[-1]
  assert 2 < stopped < 6, _committed(workdir)  # ... after the step it was in, checkpointed.
  assert f'checkpoint of step {stopped} committed' in err
  train.train_and_evaluate(tiny_config(), workdir)
  _assert_same_run(tiny_config(), workdir, straight)


def test_sigterm_with_a_stuck_save_exits_0_within_the_timeout(tmp_path, straight):
  workdir = str(tmp_path / 'run')
  proc = _start(workdir, overrides={'preemption_timeout_secs': 2},
                env={'TEST_SAVE_NEVER_FINISHES': '1'})
  _wait_for(lambda: _committed(workdir), proc)
  t0 = time.time()
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert time.time() - t0 < 30
  assert 'did not finish within config.preemption_timeout_secs=2' in err
  train.train_and_evaluate(tiny_config(), workdir)  # From whatever was committed.
  _assert_same_run(tiny_config(), workdir, straight)


def _inject_nan_at(monkeypatch, bad_step):
  calls = []
  model_inputs = train._model_inputs

  def poisoned(batch):
    calls.append(1)
    out = model_inputs(batch)
    if len(calls) == bad_step:
      out = dict(out, image=np.full_like(out['image'], np.nan))
    return out

  monkeypatch.setattr(train, '_model_inputs', poisoned)


def test_nan_raise_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  _inject_nan_at(monkeypatch, 5)
  config = tiny_config(eval_every_steps=100)  # No evaluation: checkpoints at 2, 4, 6.
  with pytest.raises(FloatingPointError, match=r'non-finite loss .* at step 5: .*step 4'):
    train.train_and_evaluate(config, str(tmp_path))
  assert _committed(str(tmp_path)) == [2, 4]  # Step 6 (after the NaN) was never saved.
  step, state = _final_state(config, str(tmp_path))
  assert step == 4 and all(np.isfinite(x).all() for x in jax.tree.leaves(state))


def test_nan_skip_keeps_the_state_and_counts(tmp_path, monkeypatch):
  _inject_nan_at(monkeypatch, 5)
  config = tiny_config(nan_policy='skip', eval_every_steps=100)
  train.train_and_evaluate(config, str(tmp_path))
  records = {r['step']: r for r in _records(str(tmp_path))}
  assert records[4]['train/skipped_steps'] == 0
  assert records[6]['train/skipped_steps'] == 1
  assert np.isfinite(records[6]['train/loss'])  # The mean over the applied step 6.
  step, state = _final_state(config, str(tmp_path))
  assert step == 6
  assert int(state.step) == 5  # Six batches, five updates.
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))


def test_unwritable_workdir_fails_before_training(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  with pytest.raises(OSError, match=r"workdir '.*file/run' is not writable"):
    train.train_and_evaluate(tiny_config(), str(blocker / 'run'))


def test_full_disk_fails_before_training(tmp_path, monkeypatch):
  usage = shutil.disk_usage(str(tmp_path))
  monkeypatch.setattr(train.shutil, 'disk_usage',
                      lambda p: usage._replace(free=1000))
  with pytest.raises(OSError, match=r'0.0 MiB free but one checkpoint needs about'):
    train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert not os.path.exists(tmp_path / 'metrics.jsonl')


def test_failed_save_is_an_error_and_commits_nothing(tmp_path, monkeypatch):
  save = ckpt._DataHandler.save

  def failing(self, directory, *args, **kwargs):
    if ckpt._saving_step == 4:
      raise OSError(errno.ENOSPC, 'No space left on device')
    return save(self, directory, *args, **kwargs)

  monkeypatch.setattr(ckpt._DataHandler, 'save', failing)
  config = tiny_config(eval_every_steps=100)
  with pytest.raises(ckpt.SaveError, match=r'step 4 .*No space left.*committed checkpoint is '
                     r'step 2'):
    train.train_and_evaluate(config, str(tmp_path))
  assert _committed(str(tmp_path)) == [2]
  assert _final_state(config, str(tmp_path))[0] == 2


def test_resuming_with_another_network_names_the_parameter(tmp_path, straight):
  workdir = str(tmp_path / 'run')
  shutil.copytree(straight, workdir)
  saved_config = open(os.path.join(workdir, 'config.json')).read()
  other = tiny_config(**{'model.feature_scale': 16})  # Twice the channels everywhere.
  with pytest.raises(ValueError, match=r'parameter params/.*(kernel|bias|scale) has shape'):
    train.train_and_evaluate(other, workdir)
  # The workdir still describes its checkpoints.
  assert open(os.path.join(workdir, 'config.json')).read() == saved_config


def test_init_from_is_ignored_when_resuming(tmp_path, straight):
  workdir = str(tmp_path / 'run')
  shutil.copytree(straight, workdir)
  # Resuming a finished run only evaluates; the missing init_from is not read.
  scores = train.train_and_evaluate(tiny_config(init_from=str(tmp_path / 'nowhere')), workdir)
  assert 'mean_iou' in scores


def test_init_from_missing_path_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"config.init_from='.*nowhere'"):
    train.train_and_evaluate(tiny_config(init_from=str(tmp_path / 'nowhere')),
                             str(tmp_path / 'run'))


@pytest.mark.parametrize('key,value', [('nan_policy', 'ignore'),
                                       ('preemption_timeout_secs', 0)])
def test_fault_settings_are_checked(tmp_path, key, value):
  with pytest.raises(config_lib.ConfigError, match=f'config.{key}={value!r}'):
    train.train_and_evaluate(tiny_config(**{key: value}), str(tmp_path))
