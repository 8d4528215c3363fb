"""Segmentation metrics: confusion matrix on device, scores on host.

The confusion matrix is the only statistic accumulated during evaluation; all
scores are derived from the matrix summed over the whole dataset (never
averaged per image or per batch), as in pytorch-semseg's ``runningScore``.

Under a ``jax.jit`` whose batch is sharded over a ``Mesh`` axis, the matrix
returned by :func:`confusion_matrix` is already the global one: the sum over
pixels is a reduction over the sharded batch axis, and XLA inserts the
cross-device all-reduce.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import clu.metrics
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# Pixels per one-hot matmul chunk: float32 accumulation of 0/1 products is
# exact up to 2**24, so a chunk must not exceed that many pixels.
_ONEHOT_CHUNK = 1 << 23


def _cm_bincount(labels: jax.Array, preds: jax.Array, ok: jax.Array,
                 num_classes: int) -> jax.Array:
  # Invalid pixels go to an extra bin that is dropped, so the scatter never
  # needs a data-dependent number of elements.
  k = num_classes
  idx = jnp.where(ok, labels * k + preds, k * k)
  return jnp.bincount(idx, length=k * k + 1)[:k * k].reshape(k, k)


def _cm_onehot(labels: jax.Array, preds: jax.Array, ok: jax.Array,
               num_classes: int) -> jax.Array:
  # labels^T @ preds of one-hot rows: a matmul, which TPUs run far faster than
  # a scatter. one_hot(-1) is an all-zero row, so invalid pixels add nothing.
  n = labels.shape[0]
  chunk = min(n, _ONEHOT_CHUNK)
  pad = (-n) % chunk
  labels = jnp.pad(jnp.where(ok, labels, -1), (0, pad), constant_values=-1)
  preds = jnp.pad(preds, (0, pad))
  lab = jax.nn.one_hot(labels.reshape(-1, chunk), num_classes,
                       dtype=jnp.bfloat16)
  prd = jax.nn.one_hot(preds.reshape(-1, chunk), num_classes,
                       dtype=jnp.bfloat16)
  per_chunk = jnp.einsum('mnk,mnj->mkj', lab, prd,
                         preferred_element_type=jnp.float32)
  return per_chunk.astype(jnp.int32).sum(axis=0)


def confusion_matrix(labels: jax.Array,
                     preds: jax.Array,
                     num_classes: int,
                     ignore_index: int = 255,
                     valid: jax.Array | None = None,
                     *,
                     method: str = 'auto') -> jax.Array:
  """Counts (ground truth, prediction) pairs over all pixels.

  A pixel is counted only if its label is in ``[0, num_classes)`` (so
  ``ignore_index`` and any other out-of-range label are skipped, like
  pytorch-semseg's ``_fast_hist``), its prediction is in ``[0, num_classes)``
  and ``valid`` (when given) is True.

  Args:
    labels: int ground truth of any shape, e.g. ``[B, H, W]``.
    preds: int predicted class ids, same shape as ``labels``.
    num_classes: K, a Python int (static under ``jax.jit``).
    ignore_index: label value to skip (also when it lies inside [0, K)).
    valid: optional bool mask broadcastable to ``labels.shape``.
    method: 'bincount' (scatter-add into K*K bins), 'onehot' (bf16 one-hot
      matmul with float32 accumulation, chunked to 2**23 pixels so counts
      stay exact) or 'auto': 'onehot' on TPU, where scatters are serialised
      and matmuls are what the hardware is for (not measured here), else
      'bincount'. Measured on one CPU core (jit, 1024x2048 image): bincount
      2.3 ms for K=19 and K=150; one-hot matmul 217 ms and 2260 ms.

  Returns:
    int32 ``[K, K]``; entry ``[i, j]`` counts pixels of class i predicted as j
    (rows are ground truth, columns predictions).
  """
  if labels.shape != preds.shape:
    raise ValueError(f'confusion_matrix: labels shape {labels.shape} != '
                     f'preds shape {preds.shape}')
  if method == 'auto':
    method = 'onehot' if jax.default_backend() == 'tpu' else 'bincount'
  if method not in ('bincount', 'onehot'):
    raise ValueError(f"confusion_matrix: unknown method {method!r}, expected "
                     "'auto', 'bincount' or 'onehot'")
  labels = jnp.asarray(labels).astype(jnp.int32)
  preds = jnp.asarray(preds).astype(jnp.int32)
  ok = ((labels >= 0) & (labels < num_classes) & (labels != ignore_index)
        & (preds >= 0) & (preds < num_classes))
  if valid is not None:
    ok &= jnp.broadcast_to(jnp.asarray(valid, bool), labels.shape)
  labels, preds, ok = labels.reshape(-1), preds.reshape(-1), ok.reshape(-1)
  if method == 'bincount':
    return _cm_bincount(labels, preds, ok, num_classes)
  return _cm_onehot(labels, preds, ok, num_classes)


def compute_scores(cm: Any) -> dict[str, Any]:
  """pytorch-semseg's ``runningScore.get_scores`` from a confusion matrix.

  With ``n = cm`` (rows ground truth), ``tp = diag(n)``, ``gt = n.sum(1)``,
  ``pr = n.sum(0)``:

  - ``pixel_acc = tp.sum() / n.sum()``
  - ``mean_acc = nanmean(tp / gt)``: a class without ground-truth pixels is
    NaN and left out of the mean.
  - ``per_class_iou = tp / (gt + pr - tp)``: NaN for a class absent from both
    ground truth and prediction; 0 for a class only predicted.
  - ``mean_iou = nanmean(per_class_iou)``.
  - ``fw_iou = sum over classes with gt > 0 of (gt / n.sum()) * iou``.

  An empty matrix gives NaN scores; no numpy warnings are emitted.

  Args:
    cm: ``[K, K]`` counts (any int/float array, device or host).

  Returns:
    dict with python floats ``pixel_acc``, ``mean_acc``, ``fw_iou``,
    ``mean_iou`` and ``per_class_iou`` (float64 numpy ``[K]``).
  """
  hist = np.asarray(cm, dtype=np.float64)
  if hist.ndim != 2 or hist.shape[0] != hist.shape[1]:
    raise ValueError(f'compute_scores: expected a square [K, K] matrix, got '
                     f'shape {hist.shape}')
  tp = np.diag(hist)
  gt = hist.sum(axis=1)
  pr = hist.sum(axis=0)
  total = hist.sum()
  with np.errstate(divide='ignore', invalid='ignore'):
    acc_cls = tp / gt
    iou = tp / (gt + pr - tp)
    pixel_acc = tp.sum() / total
    freq = gt / total

  def nanmean(x):
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float('nan')

  present = gt > 0
  fw_iou = (float((freq[present] * iou[present]).sum()) if total
            else float('nan'))
  return {
      'pixel_acc': float(pixel_acc),
      'mean_acc': nanmean(acc_cls),
      'fw_iou': fw_iou,
      'mean_iou': nanmean(iou),
      'per_class_iou': iou,
  }


def _add_counts(a: Any, b: Any) -> Any:
  # Inside jit the sum stays int32 on device. Outside, sum on host in int64:
  # a dataset easily has more than 2**31 pixels of one class (Cityscapes'
  # train split has about 6e9 pixels), which would overflow int32.
  if isinstance(a, jax.core.Tracer) or isinstance(b, jax.core.Tracer):
    return jnp.asarray(a) + jnp.asarray(b)
  return np.asarray(a, np.int64) + np.asarray(b, np.int64)


@flax.struct.dataclass
class ConfusionMatrixMetric(clu.metrics.Metric):
  """A ``clu`` metric accumulating a ``[K, K]`` confusion matrix.

  Use :meth:`configured` to fix K and the ignore index, e.g.::

    Metric = ConfusionMatrixMetric.configured(num_classes=21)
    m = Metric.empty()
    for batch in data:
      m = m.merge(eval_step(state, batch))   # eval_step returns a Metric
    scores = m.compute()                      # see compute_scores

  Merging outside ``jit`` accumulates on host in int64 (exact for any dataset
  size); inside ``jit`` it is an int32 device sum.
  """

  matrix: Any  # [K, K] int counts, rows = ground truth.

  num_classes: ClassVar[int | None] = None
  ignore_index: ClassVar[int] = 255

  @classmethod
  def configured(cls, num_classes: int,
                 ignore_index: int = 255) -> type[ConfusionMatrixMetric]:
    """Returns a subclass with K and the ignore index fixed (for ``empty``)."""
    if not isinstance(num_classes, int) or num_classes < 1:
      raise ValueError(f'ConfusionMatrixMetric: num_classes must be a '
                       f'positive int, got {num_classes!r}')

    @flax.struct.dataclass
    class _Configured(cls):
      pass

    _Configured.num_classes = num_classes
    _Configured.ignore_index = ignore_index
    _Configured.__name__ = _Configured.__qualname__ = (
        f'ConfusionMatrixMetric_K{num_classes}')
    return _Configured

  @classmethod
  def empty(cls) -> ConfusionMatrixMetric:
    if cls.num_classes is None:
      raise ValueError('ConfusionMatrixMetric.empty() needs num_classes: use '
                       'ConfusionMatrixMetric.configured(num_classes=K)')
    k = cls.num_classes
    return cls(matrix=np.zeros((k, k), np.int64))

  @classmethod
  def from_model_output(cls,
                        *,
                        labels: jax.Array,
                        preds: jax.Array | None = None,
                        logits: jax.Array | None = None,
                        valid: jax.Array | None = None,
                        mask: jax.Array | None = None,
                        num_classes: int | None = None,
                        **_) -> ConfusionMatrixMetric:
    """Builds the metric for one batch.

    Args:
      labels: int ``[B, H, W]`` ground truth.
      preds: int ``[B, H, W]`` predicted ids; or give ``logits``.
      logits: ``[B, H, W, K]`` scores, used (argmax) when ``preds`` is None.
      valid: optional bool ``[B, H, W]`` pixel mask.
      mask: optional bool ``[B]`` example mask (clu's convention, e.g. for
        padded batches); combined with ``valid``.
      num_classes: K; defaults to the configured K, then ``logits.shape[-1]``.
      **_: other model outputs, ignored (clu passes all outputs to all
        metrics of a Collection).
    """
    k = num_classes or cls.num_classes
    if k is None and logits is not None:
      k = logits.shape[-1]
    if k is None:
      raise ValueError('ConfusionMatrixMetric.from_model_output: num_classes '
                       'unknown; pass num_classes= or logits=, or use '
                       'ConfusionMatrixMetric.configured(K)')
    if preds is None:
      if logits is None:
        raise ValueError('ConfusionMatrixMetric.from_model_output: pass '
                         'preds= or logits=')
      preds = jnp.argmax(logits, axis=-1)
    if mask is not None:
      mask = jnp.asarray(mask, bool)
      mask = mask.reshape(mask.shape + (1,) * (labels.ndim - mask.ndim))
      valid = mask if valid is None else jnp.logical_and(valid, mask)
    return cls(matrix=confusion_matrix(labels, preds, k, cls.ignore_index,
                                       valid))

  def merge(self, other: ConfusionMatrixMetric) -> ConfusionMatrixMetric:
    return type(self)(matrix=_add_counts(self.matrix, other.matrix))

  def reduce(self) -> ConfusionMatrixMetric:
    # Gathered metrics have a leading device axis: sum it.
    return type(self)(matrix=jnp.sum(self.matrix, axis=0))

  def compute(self) -> dict[str, Any]:
    """Scores of :func:`compute_scores` (host-side; not jit-able)."""
    return compute_scores(self.matrix)


def _iou_rows(scores: dict[str, Any],
              class_names: Sequence[str] | None) -> list[tuple[str, float]]:
  iou = np.asarray(scores['per_class_iou'])
  if class_names is None:
    class_names = [str(i) for i in range(iou.shape[0])]
  if len(class_names) != iou.shape[0]:
    raise ValueError(f'class_names has {len(class_names)} names but '
                     f'per_class_iou has {iou.shape[0]} classes')
  return list(zip(map(str, class_names), iou.tolist()))


_SUMMARY_KEYS = (('pixel_acc', 'Pixel acc'), ('mean_acc', 'Mean acc'),
                 ('fw_iou', 'FreqW IoU'), ('mean_iou', 'Mean IoU'))


def _pct(x: float) -> str:
  # 7 characters, the width of the 'IoU (%)' header.
  return '    n/a' if np.isnan(x) else f'{100 * x:7.2f}'


def format_iou_table(scores: dict[str, Any],
                     class_names: Sequence[str] | None = None) -> str:
  """An aligned plain-text table: per-class IoU (%), then the four means.

  Args:
    scores: output of :func:`compute_scores`.
    class_names: K names; class indices when None.

  Returns:
    multi-line string; classes absent from the data show ``n/a``.
  """
  rows = _iou_rows(scores, class_names)
  labels = [name for name, _ in rows] + [t for _, t in _SUMMARY_KEYS]
  width = max(len(s) for s in labels + ['class'])
  lines = [f'{"class":<{width}}  IoU (%)', '-' * (width + 9)]
  lines += [f'{name:<{width}}  {_pct(v)}' for name, v in rows]
  lines.append('-' * (width + 9))
  lines += [f'{title:<{width}}  {_pct(scores[key])}'
            for key, title in _SUMMARY_KEYS]
  return '\n'.join(lines)


def iou_table_markdown(scores: dict[str, Any],
                       class_names: Sequence[str] | None = None) -> str:
  """The same table as :func:`format_iou_table`, as GitHub markdown."""
  rows = _iou_rows(scores, class_names)
  lines = ['| class | IoU (%) |', '|---|---:|']
  lines += [f'| {name} | {_pct(v).strip()} |' for name, v in rows]
  lines += [f'| **{title}** | **{_pct(scores[key]).strip()}** |'
            for key, title in _SUMMARY_KEYS]
  return '\n'.join(lines)
