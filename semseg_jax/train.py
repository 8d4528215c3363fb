"""Training: TrainState, the sharded train step and the train/eval loop.

One ``jax.jit`` train step runs over a ``Mesh(('data',))``: the batch is
sharded over ``'data'``, the state is replicated and donated. Gradients, the
loss mean and BatchNorm statistics are therefore over the global batch, and the
same code runs on one CPU, several devices or several hosts.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import threading
import time
from typing import Any, Callable

from absl import logging
from clu import parameter_overview
from flax.training import train_state
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from semseg_jax import checkpoint as ckpt
from semseg_jax import config as config_lib
from semseg_jax import data as data_lib
from semseg_jax import evaluate as evaluate_lib
from semseg_jax import losses
from semseg_jax import models
from semseg_jax import sharding
from semseg_jax import writers
from semseg_jax.data import pipeline


class TrainState(train_state.TrainState):
  """Step, params, optimizer state and the BatchNorm statistics."""
  batch_stats: Any = None


def create_learning_rate_fn(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up to ``optimizer.learning_rate``, then poly / cosine / constant."""
  peak = config.optimizer.learning_rate
  sched = config.schedule
  warmup = sched.warmup_steps
  decay_steps = max(config.num_train_steps - warmup, 1)
  end = peak * sched.end_lr_factor
  if sched.name == 'poly':
    main = optax.polynomial_schedule(peak, end, sched.power, decay_steps)
  elif sched.name == 'cosine':
    main = optax.cosine_decay_schedule(peak, decay_steps, alpha=sched.end_lr_factor)
  elif sched.name == 'step':
    # Boundaries are absolute steps; warm-up shifts none of them.
    main = optax.piecewise_constant_schedule(
        peak, {int(b) - warmup: sched.decay_factor for b in sched.boundaries if b > warmup})
  elif sched.name == 'exponential':
    main = optax.exponential_decay(peak, sched.decay_steps, sched.decay_factor)
  elif sched.name == 'constant':
    main = optax.constant_schedule(peak)
  else:
    raise config_lib.ConfigError(f'config.schedule.name={sched.name!r} is unknown')
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def create_optimizer(config: ml_collections.ConfigDict,
                     learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
  """SGD with momentum, Adam, AdamW or RMSProp, with optional global-norm clipping.

  ``weight_decay`` applies to every parameter, as PyTorch's optimizers (and so
  pytorch-semseg) do: added to the gradient for sgd/adam/rmsprop, decoupled for
  adamw. ``eps`` is added outside the square root, as in PyTorch.
  """
  opt = config.optimizer
  chain = []
  if opt.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  if opt.name == 'adamw':
    chain.append(optax.adamw(learning_rate_fn, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                             weight_decay=opt.weight_decay))
  else:
    if opt.weight_decay > 0:
      chain.append(optax.add_decayed_weights(opt.weight_decay))
    if opt.name == 'sgd':
      chain.append(optax.sgd(learning_rate_fn, momentum=opt.momentum or None,
                             nesterov=opt.nesterov))
    elif opt.name == 'adam':
      chain.append(optax.adam(learning_rate_fn, b1=opt.b1, b2=opt.b2, eps=opt.eps))
    elif opt.name == 'rmsprop':
      chain.append(optax.rmsprop(learning_rate_fn, decay=opt.rmsprop_decay, eps=opt.eps,
                                 eps_in_sqrt=False, momentum=opt.momentum or None))
    else:
      raise config_lib.ConfigError(f'config.optimizer.name={opt.name!r} is unknown')
  return optax.chain(*chain)


def create_model(config: ml_collections.ConfigDict) -> nn.Module:
  """The network named by ``config.model.name`` with its options and dtype."""
  kwargs = {k: v for k, v in config.model.items() if k != 'name'}
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  if config.remat:  # Per-block jax.checkpoint, where the network offers it.
    if 'remat' not in models.model_options(config.model.name):
      supported = [n for n in models.list_models() if 'remat' in models.model_options(n)]
      raise config_lib.ConfigError(
          f'config.remat=True: network {config.model.name!r} has no per-block '
          f'rematerialisation; networks with it: {", ".join(supported)}')
    kwargs['remat'] = True
  return models.get_model(config.model.name, num_classes=config.num_classes,
                          dtype=jnp.dtype(config.dtype), **kwargs)


def create_train_state(config: ml_collections.ConfigDict, model: nn.Module,
                       mesh: jax.sharding.Mesh, *, abstract: bool = False) -> TrainState:
  """Initialises (or, with ``abstract``, only shapes) a replicated TrainState."""
  h, w = config.dataset.image_size
  tx = create_optimizer(config, create_learning_rate_fn(config))

  def init(rng):
    variables = model.init({'params': rng, 'dropout': rng},
                           jnp.zeros((1, h, w, 3), jnp.float32), train=False)
    return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                             batch_stats=variables.get('batch_stats', {}))

  init_fn = jax.jit(init, out_shardings=sharding.replicated(mesh))
  # 'rbg' keys compile init several times faster than threefry on CPU (VGG: 8.7 s -> 1.5 s).
  rng = jax.random.key(config.seed, impl='rbg')
  if abstract:
    shapes = jax.eval_shape(init_fn, rng)
    repl = sharding.replicated(mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), shapes)
  return init_fn(rng)


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               loss_fn: Callable, learning_rate_fn: optax.Schedule
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on the global batch; returns the new state and scalar metrics.

  A step whose loss or gradient norm is not finite changes nothing: the old
  state (step counter included) comes back and ``metrics['skipped']`` is 1. The
  loop then raises or counts it (``config.nan_policy``); either way no
  non-finite update is ever applied or saved, and no host sync per step is
  needed to guarantee it.
  """
  dropout_rng = jax.random.fold_in(rng, state.step)

  def compute_loss(params):
    output, mutated = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
        rngs={'dropout': dropout_rng}, mutable=['batch_stats'])
    loss, terms = loss_fn(output, batch['label'])
    return loss, (mutated.get('batch_stats', {}), terms)

  (loss, (batch_stats, terms)), grads = jax.value_and_grad(compute_loss, has_aux=True)(
      state.params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  metrics = {'loss': loss, 'grad_norm': grad_norm, 'lr': learning_rate_fn(state.step),
             'skipped': 1.0 - finite.astype(jnp.float32)}
  metrics.update({f'loss_{k}': v for k, v in terms.items()})
  return new_state, metrics


def make_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                    state_sharding: Any) -> Callable:
  """The jitted, sharded, state-donating train step for ``config``."""
  step = functools.partial(train_step, loss_fn=losses.loss_fn_from_config(config.loss),
                           learning_rate_fn=create_learning_rate_fn(config))
  return jax.jit(
      step,
      in_shardings=(state_sharding, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
      out_shardings=(state_sharding, sharding.replicated(mesh)),
      donate_argnums=0)


# Fields of metrics.jsonl that measure time, not training: the only ones that
# differ between two runs with the same config, seed and device count.
TIMING_KEYS = ('train/steps_per_sec',)


class Preempted(SystemExit):
  """SIGTERM stopped training after a committed checkpoint: exit status 0.

  A ``SystemExit`` so that ``python -m semseg_jax.main`` exits 0 by itself; a
  notebook can catch it. ``step`` is the checkpointed step the restart resumes.
  """

  def __init__(self, step: int):
    super().__init__(0)
    self.step = step


def _probe_workdir(workdir: str) -> None:
  """Fails before any compilation if ``workdir`` or its checkpoints/ cannot be written."""
  try:
    for directory in (workdir, os.path.join(workdir, 'checkpoints')):
      os.makedirs(directory, exist_ok=True)
      probe = os.path.join(directory, f'.write_probe_{jax.process_index()}')
      with open(probe, 'w') as f:
        f.write('ok')
        f.flush()
        os.fsync(f.fileno())
      os.remove(probe)
  except OSError as e:
    raise OSError(f'workdir {workdir!r} is not writable: {e.strerror or e}') from None


def _check_free_space(workdir: str, state: Any) -> None:
  """Fails before training if one checkpoint of ``state`` cannot fit in ``workdir``."""
  needed = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  free = shutil.disk_usage(workdir).free
  if free < needed:
    raise OSError(f'workdir {workdir!r} has {free / 2**20:.1f} MiB free but one checkpoint '
                  f'needs about {needed / 2**20:.1f} MiB')


def _truncate_jsonl(path: str, last_step: int) -> None:
  """Drops records logged after ``last_step`` (a resumed run logs them again).

  A line torn by a crash mid-write is dropped too.
  """
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line).get('step', 0) <= last_step:
          kept.append(line if line.endswith('\n') else line + '\n')
      except ValueError:
        continue
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(kept)
  os.replace(tmp, path)


def check_dataset(config: ml_collections.ConfigDict) -> data_lib.DatasetInfo:
  """Dataset metadata; raises if it is not prepared or has another class count."""
  info = data_lib.get_dataset_info(config.dataset.name, data_dir=config.dataset.data_dir)
  if info.num_classes != config.num_classes:
    raise config_lib.ConfigError(
        f'config.num_classes={config.num_classes} but dataset {info.name!r} has '
        f'{info.num_classes} classes')
  return info


def _model_inputs(batch: dict[str, Any]) -> dict[str, np.ndarray]:
  return {'image': batch['image'], 'label': batch['label']}


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}h{seconds // 60 % 60:02d}m' if seconds >= 3600 else \
      f'{seconds // 60}m{seconds % 60:02d}s'


def init_from_checkpoint(state: TrainState, path: str) -> TrainState:
  """``state`` with params and batch_stats taken from the checkpoint at ``path``.

  ``path`` is a workdir (its latest checkpoint), e.g. one written by
  ``python -m semseg_jax.convert`` or ``semseg_jax.convert.resnet``, its
  ``checkpoints/`` or a ``checkpoints/<step>``. Every array whose path and shape
  match is loaded (backbone-only weights fill the backbone); the rest, and the
  optimizer state and step, stay as initialised.

  Raises:
    FileNotFoundError: ``path`` holds no checkpoint.
    config.ConfigError: nothing matched, or a matching path has another shape.
  """
  try:
    ckpt.resolve(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'config.init_from={path!r}: {e}') from None
  target = {'params': state.params, 'batch_stats': state.batch_stats or {}}
  first = jax.tree.leaves(target)[0]
  source, where = ckpt.load_variables(path, sharding=first.sharding)
  try:
    merged, counts = ckpt.merge_variables(target, source, where)
  except ValueError as e:
    raise config_lib.ConfigError(f'config.init_from: {e}') from None
  logging.info('init_from %s: loaded %d arrays, %d kept their initialisation, %d in the '
               'checkpoint unused', where, counts['loaded'], counts['kept'], counts['unused'])
  return state.replace(params=merged['params'],
                       batch_stats=merged['batch_stats'] if state.batch_stats else
                       state.batch_stats)


class _PreemptionWatcher:
  """Turns SIGTERM into 'stop after this step', at the same step on every process.

  One process: a SIGTERM handler sets a flag (the previous handler comes back
  on :meth:`close`). Several processes: JAX's preemption sync manager (started
  by ``jax.distributed.initialize``) catches the signal on any host and
  ``reached_preemption_sync_point`` returns True on all hosts at one step.
  """

  def __init__(self):
    self.requested = False
    self._multi = jax.process_count() > 1
    self._previous = None
    self._installed = False
    if not self._multi:
      self._install()

  def _install(self) -> None:
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True

  def _handle(self, signum, frame) -> None:
    del signum, frame  # Runs between bytecodes: only set the flag.
    self.requested = True

  def reached(self, step: int) -> bool:
    if self._multi:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError as e:  # The job was started without the sync manager.
        logging.warning('no preemption sync manager on this multi-process job (%s): SIGTERM '
                        'stops each process at its own step', e)
        self._multi = False
        self._install()
    return self.requested

  def close(self) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False


def _fetch_metrics(on_device: list[tuple[int, dict[str, jax.Array]]], loop: dict[str, Any],
                   nan_policy: str, manager: Any) -> None:
  """Moves per-step metrics to ``loop['pending']``; checks every step for non-finite values.

  Raises:
    FloatingPointError: a step had a non-finite loss or gradient norm and
      ``nan_policy == 'raise'``. Its update was not applied and nothing after
      it has been saved.
  """
  host = jax.device_get([m for _, m in on_device])
  for (step, _), metrics in zip(on_device, host):
    metrics = {k: float(v) for k, v in metrics.items()}
    if metrics['skipped']:
      what = f'non-finite loss {metrics["loss"]} / gradient norm {metrics["grad_norm"]}'
      if nan_policy == 'raise':
        try:  # Saves in flight hold checked states: let them commit first.
          ckpt.wait(manager)
        except ckpt.SaveError:
          logging.exception('the checkpoint before the non-finite step failed')
        steps = ckpt.committed_steps(manager)
        raise FloatingPointError(
            f'{what} at step {step}: training stopped (config.nan_policy=\'raise\'); the last '
            f'good checkpoint, step {steps[-1] if steps else "none"}, is kept. '
            "config.nan_policy='skip' skips such updates instead")
      loop['skipped_steps'] += 1
      logging.warning('%s at step %d: update skipped (%d so far)', what, step,
                      loop['skipped_steps'])
    loop['pending'].append(metrics)
  on_device.clear()


def _summarise(loop: dict[str, Any]) -> dict[str, float]:
  """Means over the applied steps since the last log (float64), and the skip count."""
  pending, loop['pending'] = loop['pending'], []
  applied = [m for m in pending if not m['skipped']]
  summary = {k: float(np.mean(np.asarray([m[k] for m in applied], np.float64)))
             if applied else float('nan') for k in pending[0] if k != 'skipped'}
  summary['skipped_steps'] = loop['skipped_steps']
  return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mesh: jax.sharding.Mesh | None = None, *,
                       stop_after: int | None = None) -> dict[str, Any]:
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint.

  Writes ``checkpoints/``, ``metrics.jsonl``, TensorBoard events, ``config.json``
  and ``predictions/`` into ``workdir``. A fresh run starts from
  ``config.init_from`` when set (ignored when resuming).

  Faults: a run killed at any point (``kill -9`` included) resumes from its
  last committed checkpoint and ends with the parameters, optimizer state and
  metrics.jsonl (but :data:`TIMING_KEYS`) of a run that never stopped, bitwise
  on CPU. SIGTERM finishes the current step, checkpoints it and raises
  :class:`Preempted` (exit status 0); if that save takes more than
  ``config.preemption_timeout_secs`` the process exits 0 at once, and the
  previous checkpoint is the one a restart uses. A non-finite loss or gradient
  norm raises ``FloatingPointError`` naming the step, or is skipped and
  counted in ``train/skipped_steps`` (``config.nan_policy``).

  Args:
    stop_after: stop after this step (checkpointing it) as if interrupted; the
      schedule still runs to ``num_train_steps``, and running again resumes.

  Returns:
    The validation scores of the last evaluation (empty if none ran).
  """
  config_lib.validate_config(config)  # nan_policy, preemption_timeout_secs, ... too.
  info = check_dataset(config)
  # Opening the split fails on an unprepared dataset before anything is written.
  train_source = data_lib.get_source(config.dataset, config.dataset.train_split,
                                     data_dir=config.dataset.data_dir)
  _probe_workdir(workdir)
  mesh = mesh or sharding.create_mesh()
  local_batch = sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  manager = ckpt.create_manager(workdir, keep=config.keep_checkpoints)
  resuming = manager.latest_step() is not None
  if config.init_from and not resuming:
    try:
      ckpt.resolve(config.init_from)
    except FileNotFoundError as e:
      raise FileNotFoundError(f'config.init_from={config.init_from!r}: {e}') from None

  model = create_model(config)
  config_lib.check_model_config(config, model)  # aux_weights vs the network's aux outputs.
  state = create_train_state(config, model, mesh)
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  _check_free_space(workdir, state)
  if jax.process_index() == 0:
    parameter_overview.log_parameter_overview(state.params)

  train_iter = pipeline.make_train_iterator(
      train_source, config.dataset, seed=config.seed, batch_size=local_batch,
      process_index=jax.process_index(), process_count=jax.process_count())

  start_step = 0
  # Host-side bookkeeping, checkpointed so that a resumed run logs what an
  # uninterrupted one does: metrics of steps since the last log, skip count.
  loop: dict[str, Any] = {'pending': [], 'skipped_steps': 0}
  if resuming:
    start_step = manager.latest_step()
    state = ckpt.restore(manager, start_step, state, train_iter)
    loop.update(ckpt.restore_loop_state(manager, start_step) or {})
    logging.info('resuming from step %d', start_step)
  elif config.init_from:
    state = init_from_checkpoint(state, config.init_from)
  if jax.process_index() == 0:  # After the restore: a mismatched config leaves the old one.
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  if jax.process_index() == 0:
    _truncate_jsonl(metrics_path, start_step)
  writer = writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)

  p_train_step = make_train_step(config, mesh, state_sharding)
  rng = jax.random.key(config.seed)
  evaluator = evaluate_lib.Evaluator(config, model, mesh, info)
  scores: dict[str, Any] = {}
  on_device: list[tuple[int, dict[str, jax.Array]]] = []
  t_last, step_last = time.perf_counter(), start_step
  total = config.num_train_steps
  last = total if stop_after is None else min(stop_after, total)
  preemption = _PreemptionWatcher()
  try:
    deferred = loop.pop('deferred', None)
    if deferred is not None:  # Preempted at an evaluation step: evaluate it now and log as planned.
      scores = evaluator.evaluate(state, step=start_step, writer=writer, workdir=workdir)
      writer.write_scalars(start_step, {
          **deferred, **evaluate_lib.scalar_summary(scores, info.class_names)})
    for step in range(start_step + 1, last + 1):
      batch = sharding.make_global_batch(_model_inputs(next(train_iter)), mesh)
      state, metrics = p_train_step(state, batch, rng)
      on_device.append((step, metrics))
      preempted = preemption.reached(step)
      is_log = step % config.log_every_steps == 0 or step == total
      is_eval = step % config.eval_every_steps == 0 or step == total
      is_save = (step % config.checkpoint_every_steps == 0 or step in (total, last) or is_eval
                 or preempted)
      if is_log or is_eval or is_save:
        # The only host sync: every step since the last one is checked here,
        # before this state is evaluated or saved.
        _fetch_metrics(on_device, loop, config.nan_policy, manager)
      record: dict[str, float] = {}
      if is_log:
        summary = _summarise(loop)
        now = time.perf_counter()
        summary['steps_per_sec'] = (step - step_last) / (now - t_last)
        t_last, step_last = now, step
        record.update({f'train/{k}': v for k, v in summary.items()})
        logging.info('step %d/%d | loss %.4f | lr %.3g | %.2f steps/s | ETA %s', step, total,
                     summary['loss'], summary['lr'], summary['steps_per_sec'],
                     _format_eta((total - step) / max(summary['steps_per_sec'], 1e-9)))
      if is_eval and preempted:
        # An evaluation may outlast the grace period: the restart runs it and
        # writes this step's record (the checkpoint then has no mIoU for 'best').
        loop['deferred'] = dict(record)
        record, is_eval = {}, False
      if is_eval:
        scores = evaluator.evaluate(state, step=step, writer=writer, workdir=workdir)
        record.update(evaluate_lib.scalar_summary(scores, info.class_names))
      if record:
        writer.write_scalars(step, record)
      if is_save:
        ckpt.save(manager, step, state, train_iter,
                  metrics={ckpt.BEST_METRIC: scores['mean_iou']} if is_eval else None,
                  loop_state=loop)
      if preempted:
        _stop_on_preemption(manager, writer, step, config.preemption_timeout_secs)
      if is_eval:
        t_last = time.perf_counter()  # Evaluation time is not training speed.
    if not scores and start_step == total:  # Nothing left to train: report the final state.
      scores = evaluator.evaluate(state, step=total, writer=writer, workdir=workdir)
    ckpt.wait(manager)
  except BaseException:
    # Every state handed to a save was checked: let the last one commit.
    try:
      manager.wait_until_finished()
    except Exception:  # pylint: disable=broad-except
      pass
    raise
  finally:
    preemption.close()
    try:
      manager.close()
    except Exception:  # pylint: disable=broad-except
      logging.exception('closing the checkpoint manager failed')
    writer.close()
  return scores


def _stop_on_preemption(manager: Any, writer: Any, step: int, timeout_secs: float) -> None:
  """Waits up to ``timeout_secs`` for the checkpoint of ``step``, then stops."""
  logging.warning('SIGTERM: saving step %d and stopping (at most %s s)', step, timeout_secs)
  if ckpt.wait(manager, timeout_secs):
    logging.warning('SIGTERM: checkpoint of step %d committed; exiting', step)
    raise Preempted(step)
  steps = ckpt.committed_steps(manager)
  logging.error('SIGTERM: the checkpoint of step %d did not finish within '
                'config.preemption_timeout_secs=%s; exiting now, a restart resumes from step %s',
                step, timeout_secs, steps[-1] if steps else 'none')
  writer.flush()
  writer.close()
  logging.flush()
  # Orbax's commit thread is not a daemon: only a hard exit is bounded in time.
  os._exit(0)  # pylint: disable=protected-access


def load_config_from_workdir(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a training run saved as ``workdir/config.json``."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: {workdir!r} is not a semseg-jax workdir')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_variables(config: ml_collections.ConfigDict, workdir: str, which: str = 'latest',
                      mesh: jax.sharding.Mesh | None = None) -> tuple[nn.Module, dict, int]:
  """Model, ``{'params', 'batch_stats'}`` and step of a checkpoint in ``workdir``.

  Args:
    which: 'latest' or 'best' (highest validation mIoU).
  """
  mesh = mesh or sharding.create_mesh()
  model = create_model(config)
  manager = ckpt.create_manager(workdir, read_only=True)
  step = ckpt.select_step(manager, which)
  if step is None:
    raise FileNotFoundError(f'no {which} checkpoint in {os.path.join(workdir, "checkpoints")}')
  abstract = create_train_state(config, model, mesh, abstract=True)
  state = ckpt.restore(manager, step, abstract)
  manager.close()
  return model, {'params': state.params, 'batch_stats': state.batch_stats or {}}, step
