"""Full-resolution evaluation: whole image or sliding windows, multi-scale and flip.

:class:`MultiViewPredictor` turns a network into averaged class probabilities
over ``scales x flips x windows`` (``config.eval``); both :class:`Evaluator`
(confusion matrix over a split) and ``inference.Predictor`` (label maps of
image files) use it, so evaluation and prediction agree pixel for pixel.

Everything stays on device: per batch, only the ``[K, K]`` confusion matrix is
added up (and the first batch's predictions fetched for the logs). The scores
come from the matrix of the whole split, never averaged per image.

``slide`` runs the network on ``window_batch`` windows of every image per
device call and adds their softmax probabilities into an on-device
accumulator (donated, updated in place), so the memory a call needs beyond
the image and the accumulator does not grow with the image (see
``tests/test_evaluate.py::test_slide_memory_does_not_grow_with_image``).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Mapping

import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np

from semseg_jax import metrics as metrics_lib
from semseg_jax import sharding
from semseg_jax import visualize
from semseg_jax.config import ConfigError
from semseg_jax.progress import progress

_EVAL_KEYS = ('mode', 'window', 'stride', 'window_batch', 'scales', 'flip')
_MODES = ('whole', 'slide')


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  """Resolved ``config.eval``: how one image becomes averaged probabilities.

  Attributes:
    mode: 'whole' (the network sees the full image) or 'slide' (windows).
    window: slide window ``(H, W)`` in pixels of the (scaled) image.
    stride: slide step ``(H, W)``; at most ``window`` so every pixel is covered.
    window_batch: windows of each image per network call (flipped windows count).
    scales: image scales; probabilities are averaged over them.
    flip: also average the horizontally flipped views.
  """
  mode: str = 'whole'
  window: tuple[int, int] | None = None
  stride: tuple[int, int] | None = None
  window_batch: int = 4
  scales: tuple[float, ...] = (1.0,)
  flip: bool = False

  @property
  def num_views(self) -> int:
    """Forward passes per window position: scales x flips."""
    return len(self.scales) * (2 if self.flip else 1)


def _pair(key: str, value: Any) -> tuple[int, int]:
  if (not isinstance(value, (tuple, list)) or len(value) != 2
      or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0
                 for v in value)):
    raise ConfigError(f'config.eval.{key}={value!r} must be None or (height, width) '
                      'positive ints')
  return int(value[0]), int(value[1])


def validate_eval_config(config: Mapping[str, Any]) -> EvalSpec:
  """Checks ``config.eval`` and returns it resolved as an :class:`EvalSpec`.

  ``window=None`` becomes ``config.dataset.image_size``; ``stride=None``
  becomes 2/3 of the window, rounded (at least 1). A config without an
  ``eval`` section (a workdir from before it existed) gives the defaults.

  Raises:
    ConfigError: naming the first key with an unknown name or impossible value.
  """
  cfg = config['eval'] if 'eval' in config else {}
  cfg = dict(cfg.items())
  unknown = sorted(set(cfg) - set(_EVAL_KEYS))
  if unknown:
    raise ConfigError(f'unknown config key config.eval.{unknown[0]} '
                      f'(known: {", ".join(_EVAL_KEYS)})')
  default = EvalSpec()
  mode = cfg.get('mode', default.mode)
  if mode not in _MODES:
    raise ConfigError(f'config.eval.mode={mode!r} must be one of {", ".join(_MODES)}')
  window = cfg.get('window')
  if window is None:
    window = config['dataset']['image_size']
  window = _pair('window', window)
  stride = cfg.get('stride')
  if stride is None:
    stride = tuple(max(1, int(round(w * 2 / 3))) for w in window)
  stride = _pair('stride', stride)
  if stride[0] > window[0] or stride[1] > window[1]:
    raise ConfigError(f'config.eval.stride={stride} must not exceed the window {window} '
                      '(pixels between windows would get no prediction)')
  window_batch = cfg.get('window_batch', default.window_batch)
  if (not isinstance(window_batch, (int, np.integer)) or isinstance(window_batch, bool)
      or window_batch < 1):
    raise ConfigError(f'config.eval.window_batch={window_batch!r} must be a positive int')
  scales = cfg.get('scales', default.scales)
  if isinstance(scales, (int, float)) and not isinstance(scales, bool):
    scales = (scales,)
  if (not isinstance(scales, (tuple, list)) or not scales
      or not all(isinstance(s, (int, float)) and not isinstance(s, bool)
                 and math.isfinite(s) and s > 0 for s in scales)):
    raise ConfigError(f'config.eval.scales={scales!r} must be a non-empty tuple of '
                      'positive numbers')
  flip = cfg.get('flip', default.flip)
  if not isinstance(flip, (bool, np.bool_)):
    raise ConfigError(f'config.eval.flip={flip!r} must be True or False')
  return EvalSpec(mode=mode, window=window, stride=stride, window_batch=int(window_batch),
                  scales=tuple(float(s) for s in scales), flip=bool(flip))


# ----------------------------------------------------------------------------- views


def scaled_size(hw: tuple[int, int], scale: float) -> tuple[int, int]:
  """Image size at ``scale``, rounded half up (as mmsegmentation does)."""
  return tuple(max(1, int(v * scale + 0.5)) for v in hw)


def window_starts(size: int, window: int, stride: int) -> list[int]:
  """Window offsets covering ``[0, size)`` (``size >= window``); the last ends at ``size``."""
  n = max(size - window + stride - 1, 0) // stride + 1
  return [min(i * stride, size - window) for i in range(n)]


def _resize(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
  # Bilinear, half-pixel centres, no antialiasing: torch's
  # F.interpolate(mode='bilinear', align_corners=False).
  if tuple(x.shape[1:3]) == tuple(hw):
    return x
  return jax.image.resize(x, (x.shape[0], *hw, x.shape[3]), 'bilinear',
                          antialias=False).astype(x.dtype)


def _pad_to(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
  # Zero is the mean colour of a normalised image.
  ph, pw = hw[0] - x.shape[1], hw[1] - x.shape[2]
  return x if ph == pw == 0 else jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))


def _round_up(v: int, multiple: int) -> int:
  return -(-v // multiple) * multiple


class MultiViewPredictor:
  """Class probabilities averaged over ``scales x flips x windows``, on device.

  For each scale the (normalised) images are resized bilinearly, the network
  runs on the whole image ('whole', padded with zeros up to a multiple of
  ``pad_multiple``) or on windows ('slide', the image padded up to at least
  one window), the softmax probabilities of each view are resized back to
  the input size and averaged. Flipped views are flipped back before
  averaging; in 'slide' each window is flipped on its own.

  Args:
    apply_fn: ``model.apply``; ``apply_fn(variables, x, train=False).logits``.
    num_classes: K.
    spec: the resolved :class:`EvalSpec`.
    mesh: shard the batch over this mesh's 'data' axis (its size must divide
      the batch); None: plain ``jax.jit`` (one device).
    pad_multiple: 'whole' inputs are padded to a multiple of this (32 lets
      any image through every network's strides; 1 feeds them as they are).
  """

  def __init__(self, apply_fn: Callable[..., Any], num_classes: int, spec: EvalSpec, *,
               mesh: jax.sharding.Mesh | None = None, pad_multiple: int = 1):
    if spec.mode == 'slide' and spec.window is None:
      raise ValueError("EvalSpec(mode='slide') needs window=(height, width)")
    if spec.mode == 'slide' and spec.stride is None:
      spec = dataclasses.replace(
          spec, stride=tuple(max(1, int(round(w * 2 / 3))) for w in spec.window))
    self.apply_fn = apply_fn
    self.num_classes = num_classes
    self.spec = spec
    self.mesh = mesh
    self.pad_multiple = pad_multiple
    self._whole = self._jit(self.whole_predictions, 'rb', 'b')
    self._whole_probs = self._jit(self.whole_probabilities, 'rb', 'b')
    self._group = self._jit(self._group_step, 'rbbrrr', 'b', donate=(2,))
    self._prepare = self._jit(self._prepare_scale, 'b', 'b', static=(1, 2))
    self._finish = self._jit(self._finish_scale, 'bbrb', 'b', static=(4, 5), donate=(3,))
    self._zeros = self._jit(functools.partial(jnp.zeros, dtype=jnp.float32), '', 'b',
                            static=(0,))
    self._argmax = self._jit(lambda p: jnp.argmax(p, -1).astype(jnp.int32), 'b', 'b')

  def _jit(self, fn, ins: str, outs: str, static=(), donate=()):
    if self.mesh is None:
      return jax.jit(fn, static_argnums=static, donate_argnums=donate)
    kinds = {'b': sharding.batch_sharding(self.mesh), 'r': sharding.replicated(self.mesh)}
    in_shardings = tuple(kinds[k] for k in ins)
    out_shardings = kinds[outs] if len(outs) == 1 else tuple(kinds[k] for k in outs)
    return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                   static_argnums=static, donate_argnums=donate)

  def _probs(self, variables, x: jax.Array) -> jax.Array:
    logits = self.apply_fn(variables, x, train=False).logits
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  # --- whole: every view in one traceable function.

  def whole_probabilities(self, variables, images: jax.Array) -> jax.Array:
    """``[B, H, W, 3]`` -> mean softmax ``[B, H, W, K]`` float32 (traceable)."""
    hw = tuple(images.shape[1:3])
    total = None
    for scale in self.spec.scales:
      shw = scaled_size(hw, scale)
      x = _resize(images, shw)
      padded = tuple(_round_up(v, self.pad_multiple) for v in shw)
      for flip in ((False, True) if self.spec.flip else (False,)):
        xi = x[:, :, ::-1] if flip else x
        p = self._probs(variables, _pad_to(xi, padded))[:, :shw[0], :shw[1]]
        p = _resize(p[:, :, ::-1] if flip else p, hw)
        total = p if total is None else total + p
    return total / self.spec.num_views

  def whole_predictions(self, variables, images: jax.Array) -> jax.Array:
    """``[B, H, W, 3]`` -> int32 class ids ``[B, H, W]`` (traceable)."""
    if self.spec.num_views == 1:  # One view: argmax of the logits, no softmax needed.
      hw = tuple(images.shape[1:3])
      padded = tuple(_round_up(v, self.pad_multiple) for v in hw)
      logits = self.apply_fn(variables, _pad_to(images, padded), train=False).logits
      return jnp.argmax(logits[:, :hw[0], :hw[1]], -1).astype(jnp.int32)
    return jnp.argmax(self.whole_probabilities(variables, images), -1).astype(jnp.int32)

  # --- slide: one jitted call per group of windows, accumulated in place.

  def _prepare_scale(self, images, shw, padded):
    return _pad_to(_resize(images, shw), padded)

  def _group_step(self, variables, image, acc, starts, flips, weights):
    """Adds ``weights[g] * softmax`` of window ``g`` at ``starts[g]`` into ``acc``.

    ``image`` ``[B, H, W, 3]``, ``acc`` ``[B, H, W, K]`` float32, ``starts``
    int32 ``[G, 2]``, ``flips`` bool ``[G]``, ``weights`` float32 ``[G]`` (0 for
    the filler windows of the last group).
    """
    b, c, k = image.shape[0], image.shape[3], acc.shape[3]
    wh, ww = self.spec.window
    g = starts.shape[0]
    windows = []
    for i in range(g):
      win = lax.dynamic_slice(image, (0, starts[i, 0], starts[i, 1], 0), (b, wh, ww, c))
      windows.append(jnp.where(flips[i], win[:, :, ::-1], win))
    x = jnp.stack(windows, axis=1).reshape(b * g, wh, ww, c)
    probs = self._probs(variables, x).reshape(b, g, wh, ww, k)
    for i in range(g):
      p = probs[:, i]
      p = jnp.where(flips[i], p[:, :, ::-1], p) * weights[i]
      at = (0, starts[i, 0], starts[i, 1], 0)
      acc = lax.dynamic_update_slice(acc, lax.dynamic_slice(acc, at, p.shape) + p, at)
    return acc

  def _finish_scale(self, acc, images, inv_count, total, shw, weight):
    # Mean over the windows covering each pixel, back to the input size, and
    # weighted by 1 / number of scales.
    p = (acc * inv_count)[:, :shw[0], :shw[1]]
    return total + weight * _resize(p, tuple(images.shape[1:3]))

  def slide_groups(self, padded: tuple[int, int]) -> tuple[list, np.ndarray]:
    """Window groups for a ``padded`` image and the inverse coverage ``[H, W, 1]``.

    Returns ``([(starts [G, 2] int32, flips [G] bool, weights [G] float32)], inv_count)``.
    """
    (wh, ww), (sh, sw) = self.spec.window, self.spec.stride
    views = [(y, x, f) for y in window_starts(padded[0], wh, sh)
             for x in window_starts(padded[1], ww, sw)
             for f in ((False, True) if self.spec.flip else (False,))]
    count = np.zeros(padded, np.float32)
    for y, x, _ in views:
      count[y:y + wh, x:x + ww] += 1
    g = min(self.spec.window_batch, len(views))
    views += [(0, 0, None)] * (-len(views) % g)  # Fillers: weight 0.
    groups = []
    for i in range(0, len(views), g):
      chunk = views[i:i + g]
      groups.append((np.asarray([(y, x) for y, x, _ in chunk], np.int32),
                     np.asarray([bool(f) for _, _, f in chunk]),
                     np.asarray([0.0 if f is None else 1.0 for _, _, f in chunk], np.float32)))
    return groups, (1.0 / count)[..., None]

  def slide_probabilities(self, variables, images: jax.Array) -> jax.Array:
    """``[B, H, W, 3]`` -> mean softmax ``[B, H, W, K]`` float32, window group by group."""
    b, h, w = images.shape[:3]
    total = self._zeros((b, h, w, self.num_classes))
    for scale in self.spec.scales:
      shw = scaled_size((h, w), scale)
      padded = (max(shw[0], self.spec.window[0]), max(shw[1], self.spec.window[1]))
      image = self._prepare(images, shw, padded)
      acc = self._zeros((b, *padded, self.num_classes))
      groups, inv_count = self.slide_groups(padded)
      for starts, flips, weights in groups:
        acc = self._group(variables, image, acc, starts, flips, weights)
      total = self._finish(acc, images, inv_count, total, shw, 1.0 / len(self.spec.scales))
    return total

  # --- public entry points.

  def probabilities(self, variables, images: jax.Array) -> jax.Array:
    """``[B, H, W, 3]`` normalised images -> mean softmax ``[B, H, W, K]`` float32."""
    if self.spec.mode == 'slide':
      return self.slide_probabilities(variables, images)
    return self._whole_probs(variables, images)

  def predictions(self, variables, images: jax.Array) -> jax.Array:
    """``[B, H, W, 3]`` normalised images -> int32 class ids ``[B, H, W]`` (on device)."""
    if self.spec.mode == 'slide':
      return self._argmax(self.slide_probabilities(variables, images))
    return self._whole(variables, images)


# ----------------------------------------------------------------------------- evaluation


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


def log_scores(writer, step: int, scores: dict[str, Any], class_names) -> None:
  """Writes :func:`scalar_summary` and the per-class IoU table (markdown text) to ``writer``."""
  writer.write_scalars(step, scalar_summary(scores, tuple(class_names)))
  writer.write_texts(step, {'val/iou_table': metrics_lib.iou_table_markdown(scores, class_names)})


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


def _confusion(labels, preds, valid, *, num_classes: int, ignore_index: int) -> jax.Array:
  return metrics_lib.confusion_matrix(labels, preds, num_classes, ignore_index=ignore_index,
                                      valid=valid)


class Evaluator:
  """Evaluates a model on the configured eval split (sharded over ``mesh``).

  ``config.eval`` picks whole-image or sliding-window inference, scales and
  flip. Batches may carry a boolean ``valid`` ``[B, H, W]`` (False on padding):
  those pixels are not counted, nor are labels equal to ``loss.ignore_index``.
  """

  def __init__(self, config: ml_collections.ConfigDict, model, mesh: jax.sharding.Mesh,
               info: Any):
    """``info``: the split's ``data.DatasetInfo`` (class names, palette)."""
    # Imported here so that inference (MultiViewPredictor) does not load grain.
    from semseg_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    self.config = config
    self.mesh = mesh
    self.info = info
    self.spec = validate_eval_config(config)
    self.source = data_lib.get_source(config.dataset, config.dataset.eval_split,
                                      data_dir=config.dataset.data_dir)
    self.local_batch = sharding.check_batch_size(config.eval_batch_size, mesh,
                                                 'eval_batch_size')
    self.predictor = MultiViewPredictor(model.apply, config.num_classes, self.spec, mesh=mesh)
    confusion = functools.partial(_confusion, num_classes=config.num_classes,
                                  ignore_index=config.loss.ignore_index)
    batch_s, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    # 'whole': the network and the matrix in one call; 'slide': the windows
    # first (many calls), then the matrix.
    def whole_step(variables, image, label, valid):
      preds = self.predictor.whole_predictions(variables, image)
      return confusion(label, preds, valid), preds

    self._whole_step = jax.jit(whole_step, in_shardings=(repl, batch_s, batch_s, batch_s),
                               out_shardings=(repl, batch_s))
    self._confusion = jax.jit(confusion, in_shardings=(batch_s, batch_s, batch_s),
                              out_shardings=repl)

  def _step(self, variables, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    if self.spec.mode == 'whole':
      return self._whole_step(variables, batch['image'], batch['label'], batch['valid'])
    preds = self.predictor.predictions(variables, batch['image'])
    return self._confusion(batch['label'], preds, batch['valid']), preds

  def evaluate(self, state_or_variables: Any, *, step: int | None = None, writer=None,
               workdir: str | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Scores over the whole split (``metrics.compute_scores``), plus ``confusion_matrix``.

    With ``writer``/``workdir``, the first validation images with their
    predictions and labels are logged and saved to ``workdir/predictions/``
    (scores are the caller's to log: :func:`log_scores`).
    """
    from semseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
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
      valid = batch.get('valid')
      if valid is None:
        valid = np.ones(np.shape(batch['label']), bool)
      inputs = {'image': batch['image'], 'label': batch['label'], 'valid': valid}
      batch_cm, preds = self._step(variables, sharding.make_global_batch(inputs, self.mesh))
      cm = batch_cm if cm is None else cm + batch_cm
      if first is None:
        label = np.where(np.asarray(valid, bool), batch['label'], self.config.loss.ignore_index)
        first = (batch['image'], label, _local_rows(preds))
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
    from semseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    raw = pipeline.normalization(self.config.dataset).invert(images[:n])
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
  """Writes ``<name>.json`` and ``<name>.md`` (per-class IoU) into ``workdir``.

  Returns:
    The plain-text table (``metrics.format_iou_table``) for printing.
  """
  table = metrics_lib.format_iou_table(scores, class_names)
  os.makedirs(workdir, exist_ok=True)
  serialisable = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in scores.items()}
  serialisable['class_names'] = list(class_names)
  with open(os.path.join(workdir, f'{name}.json'), 'w') as f:
    json.dump(serialisable, f, indent=2, allow_nan=True)
  with open(os.path.join(workdir, f'{name}.md'), 'w') as f:
    f.write(metrics_lib.iou_table_markdown(scores, class_names))
  return table
