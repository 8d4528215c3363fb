"""Pixel-wise segmentation losses (pytorch-semseg's ``ptsemseg/loss``).

All losses compute the softmax in float32, whatever the logits' dtype, and
exclude pixels whose label is ``ignore_index`` or outside ``[0, K)``.
pytorch-semseg uses ignore index 250; our datasets use 255 (DESIGN.md).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from semseg_jax.models import layers
from semseg_jax.models.output import SegmentationOutput

LossFn = Callable[[SegmentationOutput, jax.Array],
                  tuple[jax.Array, dict[str, jax.Array]]]


def _pixel_nll(logits: jax.Array, labels: jax.Array, ignore_index: int,
               class_weights: Any, valid: jax.Array | None
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-pixel weighted NLL, weights and validity.

  Returns:
    (``w[y] * nll``, ``w[y]``, ``ok``): float32, float32, bool ``[B, H, W]``;
    the first two are 0 where ``ok`` is False.
  """
  if logits.ndim != labels.ndim + 1 or logits.shape[:-1] != labels.shape:
    raise ValueError(f'loss: logits shape {logits.shape} does not match '
                     f'labels shape {labels.shape} (expected [B,H,W,K] and '
                     '[B,H,W])')
  k = logits.shape[-1]
  labels = labels.astype(jnp.int32)
  ok = (labels >= 0) & (labels < k) & (labels != ignore_index)
  if valid is not None:
    ok &= jnp.broadcast_to(jnp.asarray(valid, bool), labels.shape)
  safe = jnp.where(ok, labels, 0)
  nll = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), safe)
  if class_weights is None:
    w = ok.astype(jnp.float32)
  else:
    class_weights = jnp.asarray(class_weights, jnp.float32)
    if class_weights.shape != (k,):
      raise ValueError(f'loss.class_weights has shape {class_weights.shape}, '
                       f'expected ({k},) for {k} classes')
    w = jnp.where(ok, class_weights[safe], 0.0)
  # where(), not w * nll: nll of an excluded pixel is finite but meaningless.
  return jnp.where(ok, w * nll, 0.0), w, ok


def cross_entropy(logits: jax.Array,
                  labels: jax.Array,
                  *,
                  ignore_index: int = 255,
                  class_weights: Sequence[float] | jax.Array | None = None,
                  valid: jax.Array | None = None) -> jax.Array:
  """Softmax cross-entropy averaged over valid pixels (PyTorch's 'mean').

  ``loss = sum_i w[y_i] * nll_i / sum_i w[y_i]`` over valid pixels i of the
  whole batch, where ``nll_i = -log softmax(logits_i)[y_i]`` in float32 and
  ``w`` is ``class_weights`` (all ones when None). A pixel is valid if its
  label is in ``[0, K)``, differs from ``ignore_index`` and ``valid`` (when
  given) is True. Without valid pixels (or with zero total weight) the loss
  is 0 and its gradient is 0, not NaN.

  Args:
    logits: ``[B, H, W, K]`` scores, any float dtype.
    labels: int ``[B, H, W]``.
    ignore_index: label value to exclude.
    class_weights: optional ``[K]`` per-class weights.
    valid: optional bool ``[B, H, W]`` pixel mask.

  Returns:
    float32 scalar.
  """
  weighted, w, _ = _pixel_nll(logits, labels, ignore_index, class_weights,
                              valid)
  total_w = w.sum()
  has_w = total_w > 0
  return jnp.where(has_w, weighted.sum() / jnp.where(has_w, total_w, 1.0),
                   0.0)


def bootstrapped_cross_entropy(logits: jax.Array,
                               labels: jax.Array,
                               *,
                               k: int,
                               ignore_index: int = 255,
                               class_weights: Sequence[float] | jax.Array
                               | None = None,
                               valid: jax.Array | None = None) -> jax.Array:
  """pytorch-semseg's ``bootstrapped_cross_entropy2d``: mean of top-k losses.

  For each image b, the per-pixel losses ``l_i = w[y_i] * nll_i`` of its valid
  pixels are sorted and the k largest summed, then divided by k (not by their
  weights, as in pytorch-semseg); the result is averaged over the batch:
  ``loss = mean_b (sum of top-k l_i in image b) / k``. Excluded pixels are
  never selected; an image with fewer than k valid pixels contributes the sum
  of all its losses divided by k (pytorch-semseg gets the same number since
  its excluded pixels have loss 0).

  Args:
    logits: ``[B, H, W, K]`` scores, any float dtype.
    labels: int ``[B, H, W]``.
    k: pixels kept per image, ``1 <= k <= H * W``.
    ignore_index: label value to exclude.
    class_weights: optional ``[K]`` per-class weights.
    valid: optional bool ``[B, H, W]`` pixel mask.

  Returns:
    float32 scalar.
  """
  num_pixels = int(np.prod(labels.shape[1:]))
  if not isinstance(k, (int, np.integer)) or not 1 <= k <= num_pixels:
    raise ValueError(f'loss.bootstrap_k must be an int in [1, {num_pixels}] '
                     f'(pixels per image), got {k!r}')
  weighted, _, ok = _pixel_nll(logits, labels, ignore_index, class_weights,
                               valid)
  batch = labels.shape[0]
  per_pixel = jnp.where(ok, weighted, -jnp.inf).reshape(batch, -1)
  top, _ = jax.lax.top_k(per_pixel, int(k))
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  return jnp.mean(top.sum(axis=1) / k)


_LOSSES = ('cross_entropy', 'bootstrapped_cross_entropy')


def segmentation_loss(output: SegmentationOutput,
                      labels: jax.Array,
                      *,
                      loss_name: str = 'cross_entropy',
                      aux_weights: Sequence[float] = (),
                      main_weight: float = 1.0,
                      ignore_index: int = 255,
                      class_weights: Sequence[float] | jax.Array | None = None,
                      bootstrap_k: int | None = None
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted sum of the loss on the main and auxiliary logits.

  ``total = main_weight * L(output.logits) + sum_j aux_weights[j] *
  L(output.aux[j])`` where L is ``cross_entropy`` or
  ``bootstrapped_cross_entropy`` (with ``k = bootstrap_k``). Logits whose
  spatial size differs from the labels' are first resized bilinearly
  (align_corners=True) to the label size, as pytorch-semseg does.

  Args:
    output: the network's :class:`SegmentationOutput`.
    labels: int ``[B, H, W]``.
    loss_name: 'cross_entropy' or 'bootstrapped_cross_entropy'.
    aux_weights: one weight per entry of ``output.aux``.
    main_weight: weight of the main term.
    ignore_index: label value to exclude.
    class_weights: optional ``[K]`` per-class weights.
    bootstrap_k: pixels per image for the bootstrapped loss.

  Returns:
    (total float32 scalar, terms) where terms maps 'main', 'aux_0', ... to the
    unweighted float32 terms and 'total' to the total.
  """
  aux = tuple(output.aux)
  if len(aux_weights) != len(aux):
    raise ValueError(f'loss.aux_weights has {len(aux_weights)} weights but the '
                     f'model returns {len(aux)} auxiliary outputs')
  if loss_name == 'cross_entropy':
    fn = functools.partial(cross_entropy, ignore_index=ignore_index,
                           class_weights=class_weights)
  elif loss_name == 'bootstrapped_cross_entropy':
    if bootstrap_k is None:
      raise ValueError('loss.bootstrap_k must be set for '
                       "loss.name='bootstrapped_cross_entropy'")
    fn = functools.partial(bootstrapped_cross_entropy, k=bootstrap_k,
                           ignore_index=ignore_index,
                           class_weights=class_weights)
  else:
    raise ValueError(f'loss.name {loss_name!r} is not one of {_LOSSES}')

  def term(logits):
    if logits.shape[1:3] != labels.shape[1:3]:
      # pytorch-semseg's cross_entropy2d: bilinear, align_corners=True, in float32.
      logits = layers.resize(logits.astype(jnp.float32), labels.shape[1:3], 'bilinear',
                             align_corners=True)
    return fn(logits, labels)

  terms = {'main': term(output.logits)}
  total = main_weight * terms['main']
  for j, (weight, logits) in enumerate(zip(aux_weights, aux)):
    terms[f'aux_{j}'] = term(logits)
    total = total + weight * terms[f'aux_{j}']
  terms['total'] = total
  return total, terms


_CONFIG_KEYS = ('name', 'ignore_index', 'class_weights', 'aux_weights',
                'bootstrap_k', 'main_weight')


def loss_fn_from_config(loss_cfg: Mapping[str, Any]) -> LossFn:
  """``fn(output, labels) -> (loss, terms)`` from the ``config.loss`` block.

  Keys (all optional; defaults in brackets): name
  ['cross_entropy'] | 'bootstrapped_cross_entropy', ignore_index [255],
  class_weights [None] (sequence of K floats), aux_weights [()],
  bootstrap_k [None] (required for the bootstrapped loss), main_weight [1.0].
  Any other key raises ValueError naming it.
  """
  cfg = dict(loss_cfg)
  unknown = sorted(set(cfg) - set(_CONFIG_KEYS))
  if unknown:
    raise ValueError(f'unknown key loss.{unknown[0]}; expected one of '
                     f'{_CONFIG_KEYS}')
  name = cfg.get('name', 'cross_entropy')
  if name not in _LOSSES:
    raise ValueError(f'loss.name {name!r} is not one of {_LOSSES}')
  bootstrap_k = cfg.get('bootstrap_k')
  if name == 'bootstrapped_cross_entropy' and (
      not isinstance(bootstrap_k, int) or bootstrap_k < 1):
    raise ValueError(f'loss.bootstrap_k must be a positive int for '
                     f'loss.name={name!r}, got {bootstrap_k!r}')
  class_weights = cfg.get('class_weights')
  if class_weights is not None:
    class_weights = tuple(float(x) for x in class_weights)
  aux_weights = tuple(float(x) for x in (cfg.get('aux_weights') or ()))
  return functools.partial(
      segmentation_loss,
      loss_name=name,
      aux_weights=aux_weights,
      main_weight=float(cfg.get('main_weight', 1.0)),
      ignore_index=int(cfg.get('ignore_index', 255)),
      class_weights=class_weights,
      bootstrap_k=bootstrap_k)
