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
import time
from typing import Any, Callable

from absl import logging
from clu import parameter_overview
from flax.training import train_state
import flax.linen as nn
import jax
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
  """One SGD step on the global batch; returns the new state and scalar metrics."""
  dropout_rng = jax.random.fold_in(rng, state.step)

  def compute_loss(params):
    output, mutated = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
        rngs={'dropout': dropout_rng}, mutable=['batch_stats'])
    loss, terms = loss_fn(output, batch['label'])
    return loss, (mutated.get('batch_stats', {}), terms)

  (loss, (batch_stats, terms)), grads = jax.value_and_grad(compute_loss, has_aux=True)(
      state.params)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads),
             'lr': learning_rate_fn(state.step)}
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


def _probe_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_probe_{jax.process_index()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise OSError(f'workdir {workdir!r} is not writable: {e.strerror or e}') from None


def _truncate_jsonl(path: str, last_step: int) -> None:
  """Drops records logged after ``last_step`` (a resumed run logs them again)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [l for l in f if l.strip() and json.loads(l).get('step', 0) <= last_step]
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(lines)
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mesh: jax.sharding.Mesh | None = None, *,
                       stop_after: int | None = None) -> dict[str, Any]:
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint.

  Writes ``checkpoints/``, ``metrics.jsonl``, TensorBoard events, ``config.json``
  and ``predictions/`` into ``workdir``.

  Args:
    stop_after: stop after this step (checkpointing it) as if interrupted; the
      schedule still runs to ``num_train_steps``, and running again resumes.

  Returns:
    The validation scores of the last evaluation (empty if none ran).
  """
  config_lib.validate_config(config)
  info = check_dataset(config)
  _probe_workdir(workdir)
  mesh = mesh or sharding.create_mesh()
  local_batch = sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))

  model = create_model(config)
  state = create_train_state(config, model, mesh)
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  if jax.process_index() == 0:
    parameter_overview.log_parameter_overview(state.params)

  train_source = data_lib.get_source(config.dataset, config.dataset.train_split,
                                     data_dir=config.dataset.data_dir)
  train_iter = pipeline.make_train_iterator(
      train_source, config.dataset, seed=config.seed, batch_size=local_batch,
      process_index=jax.process_index(), process_count=jax.process_count())

  manager = ckpt.create_manager(workdir, keep=config.keep_checkpoints)
  start_step = 0
  if manager.latest_step() is not None:
    start_step = manager.latest_step()
    state = ckpt.restore(manager, start_step, state, train_iter)
    logging.info('resuming from step %d', start_step)
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  if jax.process_index() == 0:
    _truncate_jsonl(metrics_path, start_step)
  writer = writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)

  p_train_step = make_train_step(config, mesh, state_sharding)
  rng = jax.random.key(config.seed)
  evaluator = evaluate_lib.Evaluator(config, model, mesh, info)
  scores: dict[str, Any] = {}
  pending: list[dict[str, jax.Array]] = []
  t_last, step_last = time.perf_counter(), start_step
  total = config.num_train_steps
  last = total if stop_after is None else min(stop_after, total)
  for step in range(start_step + 1, last + 1):
    batch = sharding.make_global_batch(_model_inputs(next(train_iter)), mesh)
    state, metrics = p_train_step(state, batch, rng)
    pending.append(metrics)
    record: dict[str, float] = {}
    if step % config.log_every_steps == 0 or step == total:
      summary = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
      pending = []
      now = time.perf_counter()
      summary['steps_per_sec'] = (step - step_last) / (now - t_last)
      t_last, step_last = now, step
      if not np.isfinite(summary['loss']):
        raise FloatingPointError(f'non-finite training loss {summary["loss"]} at step {step}')
      record.update({f'train/{k}': v for k, v in summary.items()})
      logging.info('step %d/%d | loss %.4f | lr %.3g | %.2f steps/s | ETA %s', step, total,
                   summary['loss'], summary['lr'], summary['steps_per_sec'],
                   _format_eta((total - step) / max(summary['steps_per_sec'], 1e-9)))
    is_eval = step % config.eval_every_steps == 0 or step == total
    if is_eval:
      scores = evaluator.evaluate(state, step=step, writer=writer, workdir=workdir)
      record.update(evaluate_lib.scalar_summary(scores, info.class_names))
    if record:
      writer.write_scalars(step, record)
    if step % config.checkpoint_every_steps == 0 or step in (total, last) or is_eval:
      ckpt.save(manager, step, state, train_iter,
                metrics={ckpt.BEST_METRIC: scores['mean_iou']} if is_eval else None)
    if is_eval:
      t_last = time.perf_counter()  # Evaluation time is not training speed.
  manager.wait_until_finished()
  manager.close()
  writer.flush()
  if not scores and start_step == total:  # Nothing left to train: report the final state.
    scores = evaluator.evaluate(state, step=total, writer=writer, workdir=workdir)
  writer.close()
  return scores


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
