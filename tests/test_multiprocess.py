"""Two processes x 2 CPU devices train exactly like one process with 4 devices.

Each process is a fresh Python (jax reads ``XLA_FLAGS`` and the CPU collectives
choice only at start-up). The two workers join one job through
``sharding.initialize_distributed`` (``JAX_COORDINATOR_ADDRESS`` on loopback,
gloo collectives), each reads only its own slice of every global batch, and
both write the same Orbax checkpoint directory, as on a multi-host pod. A third
process trains on 4 local devices. The test compares the final parameters, read
back from each run's checkpoint through ``train.restore_variables``.

The two-process run is also stopped after step 3 and resumed from its
checkpoint (each process restores its own data-iterator position), so the
comparison covers Orbax save and restore across processes too.

This file is also the worker:
``python tests/test_multiprocess.py WORKDIR OUT [STOP_AFTER]``.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 5
STOP_AFTER = 3  # The two-process run is interrupted here and resumed.
# Measured (with the stop and resume): 87 CPU-seconds over the 3 workers; 147 s
# wall on 2 cores at load average 9 (other jobs running).
WORKER_TIMEOUT_S = 420
PREEMPT_STEPS = 100_000


def _worker(workdir: str, out: str, stop_after: int | None) -> None:
  """Trains the tiny config for NUM_STEPS steps and saves the restored params to ``out``.

  With ``stop_after`` it first stops after that step (checkpointing, as if
  preempted) and then resumes from the checkpoint to NUM_STEPS.
  """
  import jax  # pylint: disable=g-import-not-at-top  (after the environment is set)
  from semseg_jax import sharding  # pylint: disable=g-import-not-at-top

  # Before anything touches a device (testing_utils makes a key at import).
  sharding.initialize_distributed()
  from semseg_jax import train  # pylint: disable=g-import-not-at-top
  from tests import testing_utils  # pylint: disable=g-import-not-at-top
  config = _config(testing_utils)
  if stop_after is not None:
    train.train_and_evaluate(config, workdir, stop_after=stop_after)
  scores = train.train_and_evaluate(config, workdir)
  # Read the checkpoint back (every process restores its own replicas).
  _, variables, step = train.restore_variables(config, workdir)
  arrays = {jax.tree_util.keystr(path): np.asarray(leaf.addressable_shards[0].data)
            for path, leaf in jax.tree_util.tree_leaves_with_path(variables)}
  np.savez(out, step=step, mean_iou=scores['mean_iou'], process_count=jax.process_count(),
           device_count=jax.device_count(), **arrays)


def _config(testing_utils):
  # Plain SGD: Adam would turn the rounding noise in the gradients of the
  # biases in front of BatchNorm (zero in exact arithmetic) into steps of the
  # size of the learning rate, and the runs would differ by far more than
  # rounding.
  return testing_utils.tiny_config(
      num_train_steps=NUM_STEPS, eval_every_steps=NUM_STEPS, checkpoint_every_steps=NUM_STEPS,
      log_every_steps=NUM_STEPS, num_eval_images_logged=0, **{
          'optimizer.name': 'sgd', 'optimizer.learning_rate': 0.05,
          'optimizer.weight_decay': 0.0, 'schedule.name': 'constant'})


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _spawn(workdir, out, devices: int, extra_env: dict[str, str], log,
           stop_after: int | None = None) -> subprocess.Popen:
  # The cluster environment is the test's to set; the suite's compilation
  # cache (tests/conftest.py) is kept.
  env = {k: v for k, v in os.environ.items()
         if k == 'JAX_COMPILATION_CACHE_DIR'
         or not k.startswith(('JAX_', 'SLURM_', 'TPU_', 'CLOUD_TPU', 'MEGASCALE'))}
  env.update(PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo', **extra_env)
  args = [str(workdir), str(out)] + ([] if stop_after is None else [str(stop_after)])
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *args],
                          env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  proc.stdout_file = log  # Closed by _wait.
  return proc


def _wait(procs: list[tuple[str, subprocess.Popen, str]]) -> None:
  """Waits for every worker; on a failure or timeout kills the rest and shows its log."""
  deadline = time.monotonic() + WORKER_TIMEOUT_S
  try:
    for name, proc, log_path in procs:
      try:
        rc = proc.wait(timeout=max(deadline - time.monotonic(), 1))
      except subprocess.TimeoutExpired:
        rc = f'nothing (still running after {WORKER_TIMEOUT_S} s)'
      if rc:
        with open(log_path) as f:
          tail = f.read()[-3000:]
        pytest.fail(f'{name} exited with {rc}:\n{tail}')
  finally:
    for _, proc, _ in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      proc.stdout_file.close()


def _spawn_job(tmp_path, workdir, out, stop_after: int | None = None) -> list:
  """Two workers (2 CPU devices each) joined into one job; logs in ``tmp_path``."""
  port = _free_port()
  procs = []
  for pid in range(2):
    log_path = str(tmp_path / f'worker{pid}.log')
    env = {'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}', 'JAX_NUM_PROCESSES': '2',
           'JAX_PROCESS_ID': str(pid)}
    procs.append((f'process {pid} of 2', _spawn(workdir, out(pid), 2, env, open(log_path, 'w'),
                                                stop_after), log_path))
  return procs


def test_two_processes_train_like_one_process_with_four_devices(tmp_path):
  # The two processes also stop after step STOP_AFTER and resume.
  procs = _spawn_job(tmp_path, tmp_path / 'multi', lambda pid: tmp_path / f'multi{pid}.npz',
                     STOP_AFTER)
  log_path = str(tmp_path / 'single.log')
  procs.append(('single process', _spawn(tmp_path / 'single', tmp_path / 'single.npz', 4, {},
                                         open(log_path, 'w')), log_path))
  _wait(procs)

  with np.load(tmp_path / 'single.npz') as d:
    single = dict(d)
  assert (single['process_count'], single['device_count'], single['step']) == (1, 4, NUM_STEPS)
  params = [k for k in single if k.startswith("['params']")]
  assert len(params) > 10, sorted(single)
  for pid in range(2):
    with np.load(tmp_path / f'multi{pid}.npz') as d:
      multi = dict(d)
    assert (multi['process_count'], multi['device_count'], multi['step']) == (2, 4, NUM_STEPS)
    assert sorted(multi) == sorted(single)
    worst = 0.0
    for key in sorted(k for k in single if k.startswith('[')):
      # The global batch is the same examples in another row order and the
      # cross-device sums run in another order: equal up to float32 rounding.
      np.testing.assert_allclose(multi[key], single[key], rtol=1e-5, atol=1e-6, err_msg=key)
      worst = max(worst, float(np.abs(multi[key] - single[key]).max()))
    print(f'process {pid}: largest parameter difference to one process {worst:.3g}')
    # Rounding-level logit differences could flip a near-tied pixel or two.
    np.testing.assert_allclose(multi['mean_iou'], single['mean_iou'], atol=2e-3)
  # One checkpoint, written by both processes: one data-iterator state each.
  for run, files in (('multi', ['process_0-of-2.json', 'process_1-of-2.json']),
                     ('single', ['process_0-of-1.json'])):
    data_dir = tmp_path / run / 'checkpoints' / str(NUM_STEPS) / 'data'
    assert sorted(f for f in os.listdir(data_dir) if f.endswith('.json')) == files
  assert os.path.isdir(tmp_path / 'multi' / 'checkpoints' / str(STOP_AFTER))  # The stop.
  # Both runs trained (SGD moved the weights by lr * grad, grad != 0), and
  # process 0 alone wrote the metrics. (The logged losses are means over the
  # steps since the last log or resume, so they differ between the runs.)
  logs = {}
  for run in ('single', 'multi'):
    with open(tmp_path / run / 'metrics.jsonl') as f:
      logs[run] = [json.loads(line) for line in f]
    assert [r['step'] for r in logs[run]] == [NUM_STEPS], logs[run]
  assert logs['single'][0]['train/lr'] == pytest.approx(0.05)
  assert logs['single'][0]['train/grad_norm'] > 1e-3
  assert logs['multi'][0]['val/mean_iou'] == pytest.approx(single['mean_iou'], abs=2e-3)


def test_config_can_be_loaded_before_joining_the_job():
  # Loading and validating a config must not start a jax backend, or a
  # multi-host script that loads its config first could not join the job.
  code = ('import os, sys; sys.path.insert(0, os.getcwd())\n'
          'from semseg_jax import config, sharding\n'
          'config.load_config("quickstart")\n'
          'sharding.initialize_distributed()\n'
          'import jax; print("processes", jax.process_count())\n')
  env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_PREFIXES)}
  env.update(JAX_PLATFORMS='cpu', JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{_free_port()}',
             JAX_NUM_PROCESSES='1', JAX_PROCESS_ID='0')
  result = subprocess.run([sys.executable, '-c', code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=WORKER_TIMEOUT_S)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'processes 1' in result.stdout


# ------------------------------------------- which environments start a multi-process job

_ENV_PREFIXES = ('JAX_COORDINATOR', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'SLURM_', 'TPU_',
                 'CLOUD_TPU', 'MEGASCALE')
_SRUN_ENV = {'SLURM_JOB_ID': '17', 'SLURM_STEP_NODELIST': 'node[1-2]', 'SLURM_NTASKS': '8',
             'SLURM_PROCID': '3', 'SLURM_LOCALID': '3'}


@pytest.fixture
def fake_initialize(monkeypatch):
  """Clears the cluster environment and records jax.distributed.initialize calls."""
  import jax  # pylint: disable=g-import-not-at-top
  from semseg_jax import sharding  # pylint: disable=g-import-not-at-top
  for key in list(os.environ):
    if key.startswith(_ENV_PREFIXES):
      monkeypatch.delenv(key)
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  return sharding, calls


@pytest.mark.parametrize('env,expected', [
    ({}, None),
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234', 'JAX_NUM_PROCESSES': '4',
      'JAX_PROCESS_ID': '2'},
     {'coordinator_address': '10.0.0.1:1234', 'num_processes': 4, 'process_id': 2}),
    (_SRUN_ENV, {}),  # srun with 8 tasks: jax reads SLURM_* itself.
    ({**_SRUN_ENV, 'SLURM_NTASKS': '1'}, None),  # One task: one process, all devices.
    ({'SLURM_JOB_ID': '17', 'SLURM_NTASKS': '4'}, None),  # sbatch/salloc shell, no srun step.
    ({'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'}, {}),  # TPU pod: jax reads the metadata.
])
def test_initialize_distributed_reads_the_environment(fake_initialize, monkeypatch, env,
                                                      expected):
  sharding, calls = fake_initialize
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  sharding.initialize_distributed()
  assert calls == ([] if expected is None else [expected])


@pytest.mark.parametrize('env,match', [
    ({'JAX_NUM_PROCESSES': 'two'}, "JAX_NUM_PROCESSES='two' must be an integer >= 1"),
    ({'JAX_NUM_PROCESSES': '0'}, "JAX_NUM_PROCESSES='0'"),
    ({'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '2'},
     'JAX_PROCESS_ID=2 must be below JAX_NUM_PROCESSES=2'),
    ({'JAX_PROCESS_ID': '-1'}, "JAX_PROCESS_ID='-1'"),
])
def test_bad_process_environment_is_named(fake_initialize, monkeypatch, env, match):
  sharding, calls = fake_initialize
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '127.0.0.1:1234')
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  with pytest.raises(ValueError, match=match):
    sharding.initialize_distributed()
  assert not calls


def _preempted_worker(workdir: str) -> None:
  """Trains 'forever' (a checkpoint and a log line every step) until SIGTERM stops it."""
  from semseg_jax import sharding  # pylint: disable=g-import-not-at-top
  sharding.initialize_distributed()
  from semseg_jax import train  # pylint: disable=g-import-not-at-top
  from tests import testing_utils  # pylint: disable=g-import-not-at-top
  config = testing_utils.tiny_config(
      num_train_steps=PREEMPT_STEPS, eval_every_steps=PREEMPT_STEPS, log_every_steps=1,
      checkpoint_every_steps=PREEMPT_STEPS, num_eval_images_logged=0)
  train.train_and_evaluate(config, workdir)  # Raises Preempted (exit status 0).
  raise SystemExit(f'trained all {PREEMPT_STEPS} steps: SIGTERM never stopped the run')


def test_sigterm_on_one_process_stops_both_at_one_checkpointed_step(tmp_path):
  """A pod's preemption notice reaches one host: every host stops at the same step,
  that step is checkpointed with each process's data-iterator state, and all exit 0."""
  procs = _spawn_job(tmp_path, tmp_path / 'run', lambda pid: 'preempt')
  metrics = tmp_path / 'run' / 'metrics.jsonl'
  deadline = time.monotonic() + WORKER_TIMEOUT_S
  # Process 0 logs every step; two lines mean both processes are in the loop.
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
    if time.monotonic() > deadline or any(p.poll() is not None for _, p, _ in procs):
      _wait(procs)  # Shows the log of the worker that ended.
      pytest.fail('the workers never reached their second training step')
    time.sleep(0.2)
  procs[1][1].send_signal(signal.SIGTERM)  # Only process 1 is told.
  _wait(procs)  # Both must exit 0.

  ckpts = tmp_path / 'run' / 'checkpoints'
  steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
  assert len(steps) == 1 and 2 <= steps[0] < PREEMPT_STEPS, steps
  data_dir = ckpts / str(steps[0]) / 'data'
  assert sorted(f for f in os.listdir(data_dir) if f.endswith('.json')) == [
      'process_0-of-2.json', 'process_1-of-2.json']
  for pid in range(2):
    with open(tmp_path / f'worker{pid}.log') as f:
      assert f'checkpoint of step {steps[0]} committed; exiting' in f.read()


if __name__ == '__main__':
  sys.path.insert(0, ROOT)
  if sys.argv[2] == 'preempt':
    _preempted_worker(sys.argv[1])
  else:
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
