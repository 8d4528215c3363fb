"""Orbax checkpoints of the train state together with the data iterator.

Layout: ``<workdir>/checkpoints/<step>/{state,data,loop}``. ``state`` is the
TrainState pytree (params, batch_stats, optimizer state, step); ``data`` is the
grain iterator state of every process, so a resumed run reads exactly the
batches an uninterrupted run would have read; ``loop`` (JSON) holds the
trainer's host-side bookkeeping (per-step metrics not yet logged, skipped-step
count), so a resumed run also logs exactly what an uninterrupted one logs.

Atomicity: Orbax writes each step into ``<step>.orbax-checkpoint-tmp-*`` and
renames it to ``<step>`` only once every item is written (on a local file
system; on GCS a commit marker plays that role). A crash or ``kill -9`` during
a save therefore leaves the last committed checkpoint intact; the next manager
deletes the unfinished directory. The latest ``keep`` checkpoints are kept,
and so is the one with the best validation mIoU.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Mapping

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

BEST_METRIC = 'mean_iou'

# Test hook: ``SEMSEG_JAX_TEST_PAUSE_SAVE=<step>:<marker file>`` makes the save of
# <step> stop half-way (its temporary directory written, nothing committed),
# touch the marker and sleep, so a test can kill the process mid-save.
_PAUSE_ENV = 'SEMSEG_JAX_TEST_PAUSE_SAVE'
_saving_step: int | None = None


class SaveError(OSError):
  """A checkpoint could not be written (disk full, permissions, ...)."""


class _DataHandler(grain.checkpoint.CheckpointHandler):
  """grain's iterator handler; runs inside the blocking part of a save."""

  def save(self, directory, *args, **kwargs):
    super().save(directory, *args, **kwargs)
    hook = os.environ.get(_PAUSE_ENV)
    if hook and _saving_step is not None and int(hook.split(':', 1)[0]) == _saving_step:
      with open(hook.split(':', 1)[1], 'w') as f:
        f.write(str(directory))
      time.sleep(3600)


@ocp.args.register_with_handler(_DataHandler, for_save=True)
class _DataSave(grain.checkpoint.CheckpointSave):
  """``CheckpointSave`` routed to :class:`_DataHandler`."""


@ocp.args.register_with_handler(_DataHandler, for_restore=True)
class _DataRestore(grain.checkpoint.CheckpointRestore):
  """``CheckpointRestore`` routed to :class:`_DataHandler`."""


def create_manager(workdir: str, *, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  """Checkpoint manager for ``<workdir>/checkpoints`` (async saves)."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  policy = ocm.AnyPreservationPolicy([
      ocm.LatestN(n=max(keep, 1)),
      ocm.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1,
                keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy,
      best_fn=lambda m: m[BEST_METRIC],  # Makes Orbax persist the metrics with each step.
      best_mode='max',
      enable_async_checkpointing=not read_only,
      read_only=read_only,
      create=not read_only,
      cleanup_tmp_directories=not read_only,
  )
  return ocp.CheckpointManager(
      directory, options=options,
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'data': _DataHandler(),
                     'loop': ocp.JsonCheckpointHandler()})


def committed_steps(manager: ocp.CheckpointManager) -> list[int]:
  """Steps whose directory was committed (renamed from its temporary name)."""
  directory = str(manager.directory)
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _save_error(manager: ocp.CheckpointManager, what: str, e: Exception) -> SaveError:
  steps = committed_steps(manager)
  last = f'step {steps[-1]}' if steps else 'none'
  return SaveError(f'{what} in {manager.directory} failed ({type(e).__name__}: {e}); nothing '
                   f'half-written is ever restored, the last committed checkpoint is {last}')


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         data_iterator: Any | None = None, metrics: dict[str, float] | None = None,
         loop_state: Mapping[str, Any] | None = None) -> None:
  """Starts an asynchronous save of ``state`` (and the iterator) at ``step``.

  Raises:
    SaveError: this save, or the previous asynchronous one, failed.
  """
  global _saving_step
  items = {'state': ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items['data'] = _DataSave(data_iterator)
  if loop_state is not None:
    items['loop'] = ocp.args.JsonSave(dict(loop_state))
  _saving_step = step
  try:
    manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
  except Exception as e:  # pylint: disable=broad-except
    raise _save_error(manager, f'saving checkpoint step {step}', e) from e
  finally:
    _saving_step = None


def wait(manager: ocp.CheckpointManager, timeout_secs: float | None = None) -> bool:
  """Waits for the pending asynchronous save; False if ``timeout_secs`` passed first.

  Raises:
    SaveError: the pending save failed.
  """
  errors: list[Exception] = []

  def run():
    try:
      manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  if timeout_secs is None:
    run()
  else:
    # A daemon thread, so that a save stuck on a dead file system cannot keep
    # the process alive past the timeout.
    thread = threading.Thread(target=run, daemon=True, name='checkpoint_wait')
    thread.start()
    thread.join(timeout_secs)
    if thread.is_alive():
      return False
  if errors:
    raise _save_error(manager, 'writing a checkpoint', errors[0]) from errors[0]
  return True


def select_step(manager: ocp.CheckpointManager, which: str) -> int | None:
  """``which``: 'latest' or 'best' (config ``eval_checkpoint``)."""
  if which == 'latest':
    return manager.latest_step()
  if which == 'best':
    return manager.best_step()
  raise ValueError(f"config.eval_checkpoint={which!r} must be 'latest' or 'best'")


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iterator: Any | None = None) -> Any:
  """Restores the state at ``step`` with the shardings of ``abstract_state``.

  ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` (with
  ``.sharding``) or arrays; a structure or shape mismatch (another network,
  another class count) raises ``ValueError`` naming the first differing leaf.
  ``data_iterator``, when given, is set to the saved position in place.
  """
  _check_compatible(manager, step, abstract_state)
  items = {'state': ocp.args.StandardRestore(abstract_state)}
  # Converted weights (python -m semseg_jax.convert) have no data state: start the data afresh.
  if data_iterator is not None and os.path.isdir(
      os.path.join(str(manager.directory), str(step), 'data')):
    items['data'] = _DataRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  logging.info('restored checkpoint step %d from %s', step, manager.directory)
  return restored['state']


def restore_loop_state(manager: ocp.CheckpointManager, step: int) -> dict[str, Any] | None:
  """The trainer's bookkeeping saved with ``step``; None for checkpoints without it."""
  if not os.path.isdir(os.path.join(str(manager.directory), str(step), 'loop')):
    return None
  return dict(manager.restore(step, args=ocp.args.Composite(loop=ocp.args.JsonRestore()))['loop'])


def resolve(path: str) -> tuple[str, int]:
  """``(workdir, step)`` of a workdir (its latest step), its ``checkpoints/`` or a step dir.

  Raises:
    FileNotFoundError: ``path`` holds no committed checkpoint.
  """
  path = os.path.abspath(path)
  workdir, step = path, None
  base = os.path.basename(path)
  if base.isdigit() and os.path.basename(os.path.dirname(path)) == 'checkpoints':
    workdir, step = os.path.dirname(os.path.dirname(path)), int(base)
  elif base == 'checkpoints':
    workdir = os.path.dirname(path)
  directory = os.path.join(workdir, 'checkpoints')
  steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(
      directory) else []
  if step is None and steps:
    step = steps[-1]
  if step is None or step not in steps:
    raise FileNotFoundError(f'{path} holds no committed checkpoint (expected a workdir, its '
                            'checkpoints/ directory or checkpoints/<step>)')
  return workdir, step


def load_variables(path: str, sharding: jax.sharding.Sharding | None = None
                   ) -> tuple[dict[str, Any], str]:
  """``{'params', 'batch_stats'}`` of any semseg-jax checkpoint, whatever its network.

  The saved tree's own shapes and dtypes define what is read (the optimizer
  state is read and dropped), so weights of another network or optimizer load.

  Args:
    path: see :func:`resolve`.
    sharding: where the arrays go (default: the first device).

  Returns:
    The variables and a description ``'<dir>/checkpoints/<step>'`` for messages.
  """
  workdir, step = resolve(path)
  manager = create_manager(workdir, read_only=True)
  try:
    meta = manager.item_metadata(step)['state']
    tree = getattr(meta, 'tree', meta)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), tree)
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))['state']
  finally:
    manager.close()
  where = os.path.join(workdir, 'checkpoints', str(step))
  if not isinstance(state, Mapping) or 'params' not in state:
    raise ValueError(f'checkpoint {where} has no params: not a semseg-jax train state')
  return {'params': state['params'], 'batch_stats': state.get('batch_stats') or {}}, where


def merge_variables(target: Mapping[str, Any], source: Mapping[str, Any], where: str
                    ) -> tuple[dict[str, Any], dict[str, int]]:
  """``target`` with every leaf whose path and shape also exist in ``source`` replaced.

  Leaves are matched by their full path (``params/backbone/conv1/kernel``), so
  backbone-only weights fill the backbone of a larger network and its head
  keeps its initialisation.

  Returns:
    The merged tree and counts ``{'loaded', 'kept', 'unused'}``: target leaves
    taken from ``source``, target leaves left as they were, source leaves that
    matched nothing.

  Raises:
    ValueError: no path matched, or a matching path has another shape (the
      message names it). Dtypes are cast to the target's.
  """
  src = {_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(source)}
  used: set[str] = set()
  kept: list[str] = []

  def pick(path, value):
    key = _path(path)
    if key not in src:
      kept.append(key)
      return value
    if tuple(src[key].shape) != tuple(value.shape):
      raise ValueError(f'{where}: parameter {key} has shape {tuple(src[key].shape)}, the model '
                       f'expects {tuple(value.shape)} (another num_classes or network option?)')
    used.add(key)
    return jax.device_put(src[key].astype(value.dtype), value.sharding) if isinstance(
        value, jax.Array) else src[key].astype(value.dtype)

  merged = jax.tree_util.tree_map_with_path(pick, dict(target))
  if not used:
    example = next(iter(sorted(src)), 'nothing')
    raise ValueError(f'{where}: no parameter matches the model (checkpoint has e.g. {example}, '
                     f'the model e.g. {kept[0] if kept else "nothing"})')
  counts = {'loaded': len(used), 'kept': len(kept), 'unused': len(set(src) - used)}
  if kept:
    logging.info('init_from %s: %d arrays kept their initialisation, e.g. %s', where,
                 len(kept), ', '.join(kept[:5]))
  return merged, counts


def _check_compatible(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> None:
  """Compares saved leaf shapes against the target tree before reading data."""
  try:
    saved = manager.item_metadata(step)['state']
  except Exception:  # pylint: disable=broad-except
    return  # Metadata unavailable: let the restore itself report problems.
  if saved is None:
    return
  saved_leaves = {_path(p): getattr(v, 'shape', None)
                  for p, v in jax.tree_util.tree_leaves_with_path(saved)}
  target_leaves = {_path(p): tuple(v.shape)
                   for p, v in jax.tree_util.tree_leaves_with_path(abstract_state)}
  where = os.path.join(str(manager.directory), str(step))
  for key, shape in target_leaves.items():
    if key not in saved_leaves:
      raise ValueError(f'checkpoint {where} has no parameter {key}: it was written by '
                       'another network or configuration')
    if saved_leaves[key] is not None and tuple(saved_leaves[key]) != shape:
      raise ValueError(f'checkpoint {where}: parameter {key} has shape '
                       f'{tuple(saved_leaves[key])}, the model expects {shape} '
                       '(different num_classes or network options?)')
  extra = sorted(set(saved_leaves) - set(target_leaves))
  if extra:
    raise ValueError(f'checkpoint {where} has parameter {extra[0]} that the model '
                     'does not: it was written by another network or configuration')


def _path(keys) -> str:
  """'params/conv1/kernel' for any mix of attribute, dict and sequence keys."""
  parts = []
  for k in keys:
    for attr in ('name', 'key', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '/'.join(parts)
