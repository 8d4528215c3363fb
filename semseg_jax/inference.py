"""Inference: ``predict(images)`` -> label maps, and writing them as PNGs.

Images of any size go through ``evaluate.MultiViewPredictor``, the code that
evaluation uses, so ``config.eval`` (whole / slide, scales, flip) means the
same thing in ``--mode=eval`` and ``--mode=predict``.
"""
from __future__ import annotations

import glob
import os
from typing import Any

import numpy as np
from PIL import Image

from semseg_jax import evaluate
from semseg_jax import visualize
from semseg_jax.data import transforms
from semseg_jax.progress import progress

# Inputs are padded to a multiple of this, so every network's strides fit.
_PAD_MULTIPLE = 32


class Predictor:
  """A jitted ``uint8 image -> class map`` function for one model and its variables.

  Inference follows ``spec`` (``config.eval``: whole image or sliding windows,
  scales, flip) through the same :class:`evaluate.MultiViewPredictor` as
  evaluation. In 'whole' mode images are padded (with the mean colour) to a
  multiple of 32 so any size passes every network's strides; in 'slide' mode
  up to at least one window.

  Args:
    model, variables: the network and its ``{'params', 'batch_stats'}``.
    normalization: a ``data.transforms.Normalization`` (mean, std, channel
      order; ``data.pipeline.normalization(config.dataset)`` gives a
      config's) or a preset name, ``'imagenet'`` (the default) or
      ``'caffe_bgr'``.
    spec: whole/slide, scales, flip (default: one whole-image view).
  """

  def __init__(self, model, variables: dict[str, Any], *,
               normalization: transforms.Normalization | str = 'imagenet',
               spec: evaluate.EvalSpec | None = None):
    self.variables = variables
    self.normalization = (normalization if isinstance(normalization, transforms.Normalization)
                          else transforms.normalization_preset(normalization))
    self.spec = spec or evaluate.EvalSpec()
    self._views = evaluate.MultiViewPredictor(
        model.apply, _num_classes(model), self.spec, pad_multiple=_PAD_MULTIPLE)

  @classmethod
  def from_config(cls, config, model, variables: dict[str, Any]) -> Predictor:
    """Normalisation from ``config.dataset``, inference mode from ``config.eval``."""
    from semseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top (imports grain)
    return cls(model, variables, spec=evaluate.validate_eval_config(config),
               normalization=pipeline.normalization(config.dataset))

  def __call__(self, image: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` uint8 -> ``[H, W]`` uint8 class ids (any H, W)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f'expected an RGB image [H, W, 3], got shape {image.shape}')
    x = self.normalization(image)
    pred = self._views.predictions(self.variables, x[None])[0]
    return np.asarray(pred, np.uint8)


def _num_classes(model) -> int:
  num_classes = getattr(model, 'num_classes', None)
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f'cannot tell the number of classes of {type(model).__name__}: '
                     'it has no positive int attribute num_classes')
  return num_classes


def _as_image_list(images) -> tuple[list[np.ndarray], str]:
  if isinstance(images, (str, os.PathLike)):
    return [read_image(images)], 'single'
  if isinstance(images, np.ndarray) or hasattr(images, '__array__'):
    arr = np.asarray(images)
    if arr.ndim == 3:
      return [arr], 'single'
    if arr.ndim == 4:
      return list(arr), 'batch'
    raise ValueError(f'images must be [H, W, 3] or [N, H, W, 3], got shape {arr.shape}')
  return [read_image(i) if isinstance(i, (str, os.PathLike)) else np.asarray(i)
          for i in images], 'list'


def predict(images, *, workdir: str | None = None, model=None,
            variables: dict[str, Any] | None = None, checkpoint: str = 'latest',
            normalization: transforms.Normalization | str | None = None,
            spec: evaluate.EvalSpec | None = None):
  """Label maps for ``images``.

  Args:
    images: one uint8 ``[H, W, 3]`` image, a batch ``[N, H, W, 3]``, a list of
      images of any sizes, or image file paths.
    workdir: a training workdir; its config and ``checkpoint`` ('latest' or
      'best') are loaded. Otherwise pass ``model`` and ``variables``.
    normalization: a ``data.transforms.Normalization`` or a preset name
      (``'imagenet'``, ``'caffe_bgr'``); default: the workdir's
      ``config.dataset`` normalisation, or ImageNet's.
    spec: whole/slide, scales and flip; default: the workdir's ``config.eval``,
      or one whole-image view.

  Returns:
    uint8 class ids: ``[H, W]`` for one image, ``[N, H, W]`` for a batch, a list
    for a list.
  """
  predictor = _make_predictor(workdir, model, variables, checkpoint, normalization, spec)
  items, kind = _as_image_list(images)
  preds = [predictor(im) for im in items]
  if kind == 'single':
    return preds[0]
  return np.stack(preds) if kind == 'batch' else preds


def _make_predictor(workdir, model, variables, checkpoint, normalization, spec) -> Predictor:
  if workdir is not None:
    from semseg_jax import train  # pylint: disable=g-import-not-at-top (train imports us)
    config = train.load_config_from_workdir(workdir)
    from semseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top (imports grain)
    model, variables, _ = train.restore_variables(config, workdir, checkpoint)
    if normalization is None:
      normalization = pipeline.normalization(config.dataset)
    return Predictor(model, variables, normalization=normalization,
                     spec=spec or evaluate.validate_eval_config(config))
  if model is None or variables is None:
    raise ValueError('predict() needs workdir=... or both model=... and variables=...')
  return Predictor(model, variables, normalization=normalization or 'imagenet', spec=spec)


def read_image(path: str) -> np.ndarray:
  """An image file as uint8 ``[H, W, 3]`` RGB; a clear error for unreadable files."""
  try:
    with Image.open(path) as img:
      return np.asarray(img.convert('RGB'))
  except (OSError, ValueError) as e:
    raise ValueError(f'cannot read image {path}: {e}') from None


def expand_inputs(pattern: str) -> list[str]:
  """Files named by a path, a directory or a glob, sorted."""
  if os.path.isdir(pattern):
    paths = [os.path.join(pattern, f) for f in sorted(os.listdir(pattern))]
    paths = [p for p in paths if os.path.isfile(p)]
  else:
    paths = sorted(glob.glob(pattern))
  if not paths:
    raise FileNotFoundError(f'--input={pattern!r} matches no file')
  return paths


def predict_files(pattern: str, output_dir: str, predictor: Predictor, palette: np.ndarray,
                  label_pattern: str | None = None) -> list[str]:
  """Writes, per input image: ``<name>.png`` (palette label PNG),
  ``<name>_overlay.png`` and ``<name>_panel.png`` (input | prediction [| label]).

  ``label_pattern`` (e.g. ``'/data/labels/{stem}.png'``) adds ground truth to the panel.
  """
  os.makedirs(output_dir, exist_ok=True)
  paths = expand_inputs(pattern)
  written = []
  for path in progress(paths, len(paths), 'predict'):
    image = read_image(path)
    pred = predictor(image)
    stem = os.path.splitext(os.path.basename(path))[0]
    label = None
    if label_pattern:
      label_path = label_pattern.format(stem=stem)
      if os.path.exists(label_path):
        label = np.asarray(Image.open(label_path))
    out = os.path.join(output_dir, stem)
    visualize.save_label_png(out + '.png', pred, palette)
    visualize.save_image(out + '_overlay.png', visualize.overlay(image, pred, palette))
    visualize.save_image(out + '_panel.png', visualize.side_by_side(image, pred, palette, label))
    written.append(out + '.png')
  return written
