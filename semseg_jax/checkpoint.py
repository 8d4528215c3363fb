"""Orbax checkpoints of the train state together with the data iterator.

Layout: ``<workdir>/checkpoints/<step>/{state,data}``. ``state`` is the
TrainState pytree (params, batch_stats, optimizer state, step); ``data`` is the
grain iterator state of every process, so a resumed run reads exactly the
batches an uninterrupted run would have read. Orbax writes each step into a
temporary directory and renames it when complete, so a crash leaves the last
committed checkpoint intact. The latest ``keep`` checkpoints are kept, and so is
the one with the best validation mIoU.
"""
from __future__ import annotations

import os
from typing import Any

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

BEST_METRIC = 'mean_iou'


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
                     'data': grain.checkpoint.CheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         data_iterator: Any | None = None, metrics: dict[str, float] | None = None) -> None:
  """Starts an asynchronous save of ``state`` (and the iterator) at ``step``."""
  items = {'state': ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


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
    items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  logging.info('restored checkpoint step %d from %s', step, manager.directory)
  return restored['state']


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
