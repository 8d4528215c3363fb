"""Tests for semseg_jax.metrics against plain numpy references."""
import os
import subprocess
import sys
import textwrap
import warnings

import clu.metrics
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semseg_jax import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reference_cm(labels, preds, k, ignore_index=255, valid=None):
  """Pixel-by-pixel loop: the obvious definition."""
  cm = np.zeros((k, k), np.int64)
  valid = np.ones(labels.shape, bool) if valid is None else valid
  for l, p, v in zip(labels.ravel(), preds.ravel(), valid.ravel()):
    if v and 0 <= l < k and l != ignore_index and 0 <= p < k:
      cm[l, p] += 1
  return cm


def _reference_scores(cm):
  """Per-class loops over the runningScore definitions, NaN for absent."""
  cm = np.asarray(cm, np.float64)
  k = cm.shape[0]
  total = cm.sum()
  iou, acc = [], []
  for c in range(k):
    tp, gt, pr = cm[c, c], cm[c].sum(), cm[:, c].sum()
    acc.append(tp / gt if gt else np.nan)
    iou.append(tp / (gt + pr - tp) if gt + pr else np.nan)
  fw = sum(cm[c].sum() / total * iou[c] for c in range(k) if cm[c].sum())
  return {
      'pixel_acc': np.trace(cm) / total,
      'mean_acc': np.mean([a for a in acc if not np.isnan(a)]),
      'mean_iou': np.mean([i for i in iou if not np.isnan(i)]),
      'fw_iou': fw,
      'per_class_iou': np.array(iou),
  }


def _random_batch(rng, shape, k):
  labels = rng.integers(0, k, shape)
  preds = rng.integers(0, k, shape)
  # ignore, other out-of-range labels, out-of-range predictions
  labels[rng.random(shape) < 0.1] = 255
  labels.flat[:3] = [-1, k, 254]
  preds.flat[3] = k + 2
  return labels.astype(np.int32), preds.astype(np.int32)


@pytest.mark.parametrize('method', ['bincount', 'onehot'])
def test_confusion_matrix_matches_reference(method):
  rng = np.random.default_rng(0)
  k = 7
  labels, preds = _random_batch(rng, (3, 9, 11), k)
  valid = rng.random(labels.shape) < 0.8
  fn = jax.jit(metrics.confusion_matrix, static_argnums=2,
               static_argnames=('method',))
  got = fn(labels, preds, k, valid=valid, method=method)
  assert got.dtype == jnp.int32 and got.shape == (k, k)
  np.testing.assert_array_equal(got, _reference_cm(labels, preds, k,
                                                   valid=valid))
  got = fn(labels, preds, k, method=method)
  np.testing.assert_array_equal(got, _reference_cm(labels, preds, k))


def test_confusion_matrix_ignore_index_inside_range_and_rows_are_gt():
  labels = np.array([[0, 1, 1, 2]])
  preds = np.array([[1, 1, 2, 2]])
  cm = metrics.confusion_matrix(labels, preds, 3, ignore_index=0)
  np.testing.assert_array_equal(cm, [[0, 0, 0], [0, 1, 1], [0, 0, 1]])


def test_confusion_matrix_onehot_chunking_is_exact(monkeypatch):
  # Small chunks with padding exercise the same code path as 2**23 pixels.
  monkeypatch.setattr(metrics, '_ONEHOT_CHUNK', 64)
  rng = np.random.default_rng(1)
  labels, preds = _random_batch(rng, (2, 10, 15), 5)  # 300 = 4*64 + 44
  np.testing.assert_array_equal(
      metrics.confusion_matrix(labels, preds, 5, method='onehot'),
      _reference_cm(labels, preds, 5))


def test_confusion_matrix_errors():
  with pytest.raises(ValueError, match='shape'):
    metrics.confusion_matrix(np.zeros((2, 3)), np.zeros((2, 4)), 3)
  with pytest.raises(ValueError, match="'scatter'"):
    metrics.confusion_matrix(np.zeros((2, 3)), np.zeros((2, 3)), 3,
                             method='scatter')


def test_compute_scores_hand_example():
  s = metrics.compute_scores(np.array([[3, 1], [0, 2]]))
  assert s['pixel_acc'] == pytest.approx(5 / 6)
  assert s['mean_acc'] == pytest.approx((3 / 4 + 1) / 2)
  np.testing.assert_allclose(s['per_class_iou'], [3 / 4, 2 / 3])
  assert s['mean_iou'] == pytest.approx((3 / 4 + 2 / 3) / 2)
  assert s['fw_iou'] == pytest.approx(4 / 6 * 3 / 4 + 2 / 6 * 2 / 3)
  assert all(type(s[key]) is float
             for key in ('pixel_acc', 'mean_acc', 'fw_iou', 'mean_iou'))


def test_compute_scores_random_with_absent_classes():
  rng = np.random.default_rng(2)
  k = 9
  labels, preds = _random_batch(rng, (2, 20, 20), k)
  labels[labels == 3] = 4   # class 3: predicted, never in ground truth
  preds[preds == 3] = 4
  labels[labels == 5] = 6   # class 5: absent from both
  preds[preds == 5] = 6
  preds[preds == 7] = 8     # class 7: in ground truth, never predicted
  preds.flat[10] = 3
  cm = _reference_cm(labels, preds, k)
  assert cm[3].sum() == 0 and cm[:, 3].sum() > 0 and cm[5].sum() == 0
  assert cm[7].sum() > 0 and cm[:, 7].sum() == 0
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    got = metrics.compute_scores(metrics.confusion_matrix(labels, preds, k))
  want = _reference_scores(cm)
  np.testing.assert_allclose(got['per_class_iou'], want['per_class_iou'])
  assert np.isnan(got['per_class_iou'][5])
  assert got['per_class_iou'][3] == 0.0 and got['per_class_iou'][7] == 0.0
  for key in ('pixel_acc', 'mean_acc', 'mean_iou', 'fw_iou'):
    assert got[key] == pytest.approx(want[key], rel=1e-12), key


def test_compute_scores_empty_matrix_is_nan_without_warnings():
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    s = metrics.compute_scores(np.zeros((3, 3), np.int32))
  assert all(np.isnan(s[key])
             for key in ('pixel_acc', 'mean_acc', 'fw_iou', 'mean_iou'))
  assert np.isnan(s['per_class_iou']).all()
  with pytest.raises(ValueError, match='square'):
    metrics.compute_scores(np.zeros((3, 4)))


def test_metric_accumulates_like_one_matrix():
  rng = np.random.default_rng(3)
  k = 4
  metric_cls = metrics.ConfusionMatrixMetric.configured(k)
  total = metric_cls.empty()
  all_labels, all_preds = [], []
  step = jax.jit(lambda l, lg: metric_cls.from_model_output(
      labels=l, logits=lg, loss=0.0))  # extra outputs are ignored
  for _ in range(3):
    labels, preds = _random_batch(rng, (2, 6, 6), k)
    preds = np.clip(preds, 0, k - 1)
    total = total.merge(step(labels, jax.nn.one_hot(preds, k)))
    all_labels.append(labels)
    all_preds.append(preds)
  want = _reference_cm(np.stack(all_labels), np.stack(all_preds), k)
  np.testing.assert_array_equal(total.matrix, want)
  assert total.matrix.dtype == np.int64
  got = total.compute()
  assert got['mean_iou'] == pytest.approx(_reference_scores(want)['mean_iou'])


def test_metric_in_clu_collection():
  metric_cls = metrics.ConfusionMatrixMetric.configured(3)
  collection_cls = clu.metrics.Collection.create(
      cm=metric_cls, loss=clu.metrics.Average.from_output('loss'))
  labels = np.array([[[0, 1, 2, 255]]])
  logits = jax.nn.one_hot(np.array([[[0, 2, 2, 1]]]), 3)
  c = collection_cls.empty().merge(collection_cls.single_from_model_output(
      labels=labels, logits=logits, loss=jnp.array(2.0)))
  out = c.compute()
  assert out['loss'] == 2.0
  np.testing.assert_allclose(out['cm']['per_class_iou'], [1.0, 0.0, 0.5])


def test_metric_example_mask_and_errors():
  labels = np.array([[[0, 1]], [[1, 1]]])
  preds = np.array([[[0, 0]], [[1, 1]]])
  m = metrics.ConfusionMatrixMetric.from_model_output(
      labels=labels, preds=preds, mask=np.array([True, False]), num_classes=2)
  np.testing.assert_array_equal(m.matrix, [[1, 0], [1, 0]])
  with pytest.raises(ValueError, match='num_classes'):
    metrics.ConfusionMatrixMetric.empty()
  with pytest.raises(ValueError, match='num_classes'):
    metrics.ConfusionMatrixMetric.from_model_output(labels=labels, preds=preds)
  with pytest.raises(ValueError, match='positive int'):
    metrics.ConfusionMatrixMetric.configured(0)


def test_metric_host_merge_does_not_overflow_int32():
  metric_cls = metrics.ConfusionMatrixMetric.configured(2)
  big = metric_cls(matrix=jnp.full((2, 2), 2**31 - 1, jnp.int32))
  merged = big.merge(big).merge(big)
  assert merged.matrix[0, 0] == 3 * (2**31 - 1)


def test_metric_in_jit_merge_and_reduce():
  metric_cls = metrics.ConfusionMatrixMetric.configured(2)
  a = metric_cls(matrix=jnp.array([[1, 2], [3, 4]], jnp.int32))
  merged = jax.jit(lambda x, y: x.merge(y))(a, a)
  np.testing.assert_array_equal(merged.matrix, [[2, 4], [6, 8]])
  stacked = jax.tree.map(lambda x: jnp.stack([x, 2 * x, 3 * x]), a)
  np.testing.assert_array_equal(stacked.reduce().matrix, 6 * a.matrix)


def test_iou_tables():
  scores = metrics.compute_scores(np.array([[3, 1, 0], [0, 2, 0],
                                            [0, 0, 0]]))
  text = metrics.format_iou_table(scores, ['road', 'sidewalk', 'sky'])
  lines = text.splitlines()
  assert lines[0].startswith('class') and 'IoU' in lines[0]
  assert lines[2].split() == ['road', '75.00']
  assert lines[3].split() == ['sidewalk', '66.67']
  assert lines[4].split() == ['sky', 'n/a']
  assert lines[-1].split() == ['Mean', 'IoU', '70.83']
  # right-aligned numbers: every row has the same width
  assert len({len(line) for line in lines}) == 1
  md = metrics.iou_table_markdown(scores, ['road', 'sidewalk', 'sky'])
  assert '| road | 75.00 |' in md and '| **Mean IoU** | **70.83** |' in md
  assert metrics.format_iou_table(scores).splitlines()[2].split()[0] == '0'
  with pytest.raises(ValueError, match='class_names has 2 names'):
    metrics.format_iou_table(scores, ['a', 'b'])


_SHARDED_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from semseg_jax import metrics
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ('data',))
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, (16, 8, 8)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.2] = 255
    preds = rng.integers(0, 6, (16, 8, 8)).astype(np.int32)
    batch = NamedSharding(mesh, P('data'))
    l, p = jax.device_put(labels, batch), jax.device_put(preds, batch)
    assert len(l.addressable_shards) == 8
    want = np.zeros((6, 6), np.int64)
    ok = labels != 255
    np.add.at(want, (labels[ok], preds[ok]), 1)
    for method in ('bincount', 'onehot'):
      fn = jax.jit(lambda l, p: metrics.confusion_matrix(l, p, 6,
                                                         method=method),
                   out_shardings=NamedSharding(mesh, P()))
      got = fn(l, p)
      np.testing.assert_array_equal(np.asarray(got), want)
      # Every device holds the full (global) matrix.
      for shard in got.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), want)
    print('OK')
    """)


def test_confusion_matrix_sharded_batch_gives_global_matrix():
  env = dict(os.environ,
             XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu',
             PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  result = subprocess.run([sys.executable, '-c', _SHARDED_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith('OK')
