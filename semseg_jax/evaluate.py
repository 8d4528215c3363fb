"""Evaluation: confusion matrix over a whole split, on device, summed over the mesh.

Only the ``[K, K]`` confusion matrix (and a few predictions for the logs) leave
the devices; the scores are computed from the matrix of the whole split, never
averaged per image.
"""
from __future__ import annotations

import functools
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from semseg_jax import data as data_lib
from semseg_jax import visualize
from semseg_jax import metrics as metrics_lib
from semseg_jax import sharding
from semseg_jax.data import pipeline
from semseg_jax.progress import progress


def eval_step(variables: dict[str, Any], batch: dict[str, jax.Array], *, apply_fn,
              num_classes: int, ignore_index: int) -> tuple[jax.Array, jax.Array]:
  """Returns the batch's confusion matrix ``[K, K]`` and predictions ``[B, H, W]``."""
  output = apply_fn(variables, batch['image'], train=False)
  preds = jnp.argmax(output.logits, axis=-1).astype(jnp.int32)
  cm = metrics_lib.confusion_matrix(batch['label'], preds, num_classes,
                                    ignore_index=ignore_index)
  return cm, preds


def as_variables(state_or_variables: Any) -> dict[str, Any]:
  """``{'params', 'batch_stats'}`` from a TrainState or a variables dict."""
  if isinstance(state_or_variables, dict):
    return dict(state_or_variables)
  return {'params': state_or_variables.params,
          'batch_stats': state_or_variables.batch_stats or {}}


def scalar_summary(scores: dict[str, Any], class_names: tuple[str, ...]) -> dict[str, float]:
  """Flat ``val/...`` scalars (means and per-class IoU) for the writers."""
  out = {f'val/{k}': float(scores[k]) for k in ('mean_iou', 'pixel_acc', 'mean_acc', 'fw_iou')}
  for name, iou in zip(class_names, scores['per_class_iou']):
    out[f'val/iou/{name}'] = float(iou)
  return out


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded array, in order."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  seen, rows = set(), []
  for s in shards:
    start = s.index[0].start or 0
    if start not in seen:
      seen.add(start)
      rows.append(np.asarray(s.data))
  return np.concatenate(rows)


class Evaluator:
  """Evaluates a model on the configured eval split (sharded over ``mesh``)."""

  def __init__(self, config: ml_collections.ConfigDict, model, mesh: jax.sharding.Mesh,
               info: data_lib.DatasetInfo):
    self.config = config
    self.mesh = mesh
    self.info = info
    self.source = data_lib.get_source(config.dataset, config.dataset.eval_split,
                                      data_dir=config.dataset.data_dir)
    self.local_batch = sharding.check_batch_size(config.eval_batch_size, mesh,
                                                 'eval_batch_size')
    step = functools.partial(eval_step, apply_fn=model.apply, num_classes=config.num_classes,
                             ignore_index=config.loss.ignore_index)
    self._step = jax.jit(step, in_shardings=(sharding.replicated(mesh),
                                             sharding.batch_sharding(mesh)),
                         out_shardings=(sharding.replicated(mesh),
                                        sharding.batch_sharding(mesh)))

  def evaluate(self, state_or_variables: Any, *, step: int | None = None, writer=None,
               workdir: str | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Scores over the whole split (``metrics.compute_scores``), plus ``confusion_matrix``.

    With ``writer``/``workdir``, the first validation images with their
    predictions and labels are logged and saved to ``workdir/predictions/``.
    """
    variables = as_variables(state_or_variables)
    data_cfg = self.config.dataset
    iterator = pipeline.make_eval_iterator(
        self.source, data_cfg, batch_size=self.local_batch,
        process_index=jax.process_index(), process_count=jax.process_count())
    total = math.ceil(len(self.source) / self.config.eval_batch_size)
    cm = None
    first = None
    for batch in progress(iterator, total, 'eval',
                          enabled=show_progress and jax.process_index() == 0):
      inputs = {'image': batch['image'], 'label': batch['label']}
      batch_cm, preds = self._step(variables, sharding.make_global_batch(inputs, self.mesh))
      cm = batch_cm if cm is None else cm + batch_cm
      if first is None:
        first = (batch['image'], batch['label'], _local_rows(preds))
    if cm is None:
      raise ValueError(f'eval split {data_cfg.eval_split!r} of dataset {data_cfg.name!r} is empty')
    cm = np.asarray(jax.device_get(cm))
    scores = metrics_lib.compute_scores(cm)
    scores['confusion_matrix'] = cm
    if first is not None and (writer is not None or workdir is not None):
      self._log_predictions(first, step, writer, workdir)
    return scores

  def _log_predictions(self, first, step, writer, workdir):
    images, labels, preds = first
    n = min(self.config.num_eval_images_logged, len(images))
    if n <= 0 or jax.process_index() != 0:
      return
    raw = visualize.denormalize(images[:n], self.config.dataset.mean, self.config.dataset.std)
    grid = np.concatenate([
        visualize.side_by_side(raw[i], preds[i], self.info.palette, labels[i])
        for i in range(n)], axis=0)
    if writer is not None:
      writer.write_images(step or 0, {'val/predictions': grid})
    if workdir is not None:
      out = os.path.join(workdir, 'predictions')
      os.makedirs(out, exist_ok=True)
      visualize.save_image(os.path.join(out, f'val_step_{step or 0:06d}.png'), grid)


def write_report(scores: dict[str, Any], class_names, workdir: str, name: str = 'eval') -> str:
  """Writes ``<name>.json`` and ``<name>.md`` (per-class IoU) into ``workdir``; returns the table."""
  table = metrics_lib.format_iou_table(scores, class_names)
  os.makedirs(workdir, exist_ok=True)
  serialisable = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in scores.items()}
  serialisable['class_names'] = list(class_names)
  with open(os.path.join(workdir, f'{name}.json'), 'w') as f:
    json.dump(serialisable, f, indent=2, allow_nan=True)
  with open(os.path.join(workdir, f'{name}.md'), 'w') as f:
    f.write(metrics_lib.iou_table_markdown(scores, class_names))
  return table
