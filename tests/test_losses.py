"""Tests for semseg_jax.losses against numpy references."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from semseg_jax import losses
from semseg_jax.models import layers
from semseg_jax.models.output import SegmentationOutput


def _np_pixel_losses(logits, labels, ignore_index=255, weights=None,
                     valid=None):
  """float64 per-pixel w[y]*nll, w[y] and validity, by the textbook formula."""
  logits = np.asarray(logits, np.float64)
  k = logits.shape[-1]
  ok = (labels >= 0) & (labels < k) & (labels != ignore_index)
  if valid is not None:
    ok &= valid
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  safe = np.where(ok, labels, 0)
  nll = -np.take_along_axis(logp, safe[..., None], -1)[..., 0]
  w = np.ones(k) if weights is None else np.asarray(weights, np.float64)
  wy = np.where(ok, w[safe], 0.0)
  return wy * np.where(ok, nll, 0.0), wy, ok


def _np_cross_entropy(*args, **kw):
  wl, wy, _ = _np_pixel_losses(*args, **kw)
  return wl.sum() / wy.sum() if wy.sum() > 0 else 0.0


def _np_bootstrapped(logits, labels, k, **kw):
  wl, _, ok = _np_pixel_losses(logits, labels, **kw)
  per_image = []
  for b in range(labels.shape[0]):
    vals = np.sort(wl[b][ok[b]])[::-1][:k]
    per_image.append(vals.sum() / k)
  return np.mean(per_image)


def _np_resize_align_corners(x, out_h, out_w):
  """Per output pixel: bilinear between the 4 neighbours, corners aligned."""
  b, h, w, c = x.shape
  out = np.zeros((b, out_h, out_w, c))
  for i in range(out_h):
    for j in range(out_w):
      y = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
      xx = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
      y0, x0 = int(np.floor(y)), int(np.floor(xx))
      y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
      dy, dx = y - y0, xx - x0
      out[:, i, j] = ((1 - dy) * (1 - dx) * x[:, y0, x0]
                      + (1 - dy) * dx * x[:, y0, x1]
                      + dy * (1 - dx) * x[:, y1, x0] + dy * dx * x[:, y1, x1])
  return out


def _batch(seed=0, shape=(2, 5, 6), k=4):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=shape + (k,)).astype(np.float32) * 3
  labels = rng.integers(0, k, shape).astype(np.int32)
  labels[rng.random(shape) < 0.2] = 255
  labels.flat[:2] = [-1, k]  # out of range: excluded like ignore
  return logits, labels


def test_cross_entropy_hand_example():
  # pixel A: logits (0, 0), label 1 (weight 3) -> nll = ln 2
  # pixel B: logits (ln 3, 0), label 0 (weight 1) -> p = 3/4, nll = ln(4/3)
  logits = jnp.array([[[[0.0, 0.0], [np.log(3.0), 0.0]]]])
  labels = jnp.array([[[1, 0]]])
  got = losses.cross_entropy(logits, labels, class_weights=[1.0, 3.0])
  assert got == pytest.approx((3 * np.log(2) + np.log(4 / 3)) / 4, rel=1e-6)
  got = losses.cross_entropy(logits, labels)
  assert got == pytest.approx((np.log(2) + np.log(4 / 3)) / 2, rel=1e-6)


@pytest.mark.parametrize('weights', [None, [0.5, 2.0, 1.0, 3.0]])
def test_cross_entropy_matches_numpy(weights):
  logits, labels = _batch()
  valid = np.random.default_rng(1).random(labels.shape) < 0.9
  fn = jax.jit(lambda lg, lb, v: losses.cross_entropy(
      lg, lb, class_weights=weights, valid=v))
  got = fn(logits, labels, valid)
  assert got.dtype == jnp.float32 and got.shape == ()
  want = _np_cross_entropy(logits, labels, weights=weights, valid=valid)
  assert got == pytest.approx(want, rel=1e-5)


def test_cross_entropy_gradient_matches_softmax_minus_onehot():
  logits, labels = _batch(seed=2)
  weights = np.array([0.5, 2.0, 1.0, 3.0])
  grad = jax.grad(lambda lg: losses.cross_entropy(
      lg, labels, class_weights=weights))(logits)
  _, wy, ok = _np_pixel_losses(logits, labels, weights=weights)
  x = logits.astype(np.float64)
  p = np.exp(x - x.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  onehot = np.eye(4)[np.where(ok, labels, 0)]
  want = (p - onehot) * (wy / wy.sum())[..., None]
  np.testing.assert_allclose(grad, want, atol=1e-6)


def test_cross_entropy_bfloat16_logits_computed_in_float32():
  logits, labels = _batch(seed=3)
  bf16 = jnp.asarray(logits, jnp.bfloat16)
  got = losses.cross_entropy(bf16, labels)
  assert got.dtype == jnp.float32
  # Same value as float32 math on the bf16-rounded inputs.
  want = _np_cross_entropy(np.asarray(bf16.astype(jnp.float32)), labels)
  assert got == pytest.approx(want, rel=1e-5)
  grad = jax.grad(lambda x: losses.cross_entropy(x, labels))(bf16)
  assert grad.dtype == jnp.bfloat16


def test_cross_entropy_no_valid_pixel_is_zero_without_nan():
  logits, _ = _batch()
  labels = np.full(logits.shape[:-1], 255, np.int32)
  loss, grad = jax.value_and_grad(
      lambda lg: losses.cross_entropy(lg, labels))(logits)
  assert loss == 0.0
  assert np.all(np.asarray(grad) == 0.0)
  # zero total weight counts as no valid pixel
  labels = np.zeros(logits.shape[:-1], np.int32)
  assert losses.cross_entropy(logits, labels,
                              class_weights=[0.0, 1, 1, 1]) == 0.0


def test_cross_entropy_errors():
  logits, labels = _batch()
  with pytest.raises(ValueError, match='loss.class_weights'):
    losses.cross_entropy(logits, labels, class_weights=[1.0, 2.0])
  with pytest.raises(ValueError, match='does not match'):
    losses.cross_entropy(logits, labels[:, :3])


@pytest.mark.parametrize('k,weights', [(5, None), (13, [0.5, 2.0, 1.0, 3.0]),
                                       (30, None)])
def test_bootstrapped_cross_entropy_matches_numpy(k, weights):
  # k=30 equals H*W: more than the valid pixels of each image.
  logits, labels = _batch(seed=4)
  got = jax.jit(lambda lg, lb: losses.bootstrapped_cross_entropy(
      lg, lb, k=k, class_weights=weights))(logits, labels)
  want = _np_bootstrapped(logits, labels, k, weights=weights)
  assert got == pytest.approx(want, rel=1e-5)


def test_bootstrapped_never_selects_ignored_pixels():
  # The ignored pixel has the largest "loss" if it were counted as class 0.
  logits = np.zeros((1, 1, 3, 2), np.float32)
  logits[0, 0, 0] = [-10.0, 10.0]   # ignored
  logits[0, 0, 1] = [0.0, 1.0]      # label 0: nll = ln(1 + e)
  logits[0, 0, 2] = [1.0, 0.0]      # label 0: nll = ln(1 + 1/e)
  labels = np.array([[[255, 0, 0]]])
  got = losses.bootstrapped_cross_entropy(logits, labels, k=1)
  assert got == pytest.approx(np.log1p(np.e), rel=1e-6)
  got = losses.bootstrapped_cross_entropy(logits, labels, k=3)
  assert got == pytest.approx((np.log1p(np.e) + np.log1p(1 / np.e)) / 3,
                              rel=1e-6)


@pytest.mark.parametrize('k', [0, 31, 2.5])
def test_bootstrapped_bad_k(k):
  logits, labels = _batch()
  with pytest.raises(ValueError, match='loss.bootstrap_k'):
    losses.bootstrapped_cross_entropy(logits, labels, k=k)


def test_resize_align_corners_matches_reference():
  x = np.random.default_rng(5).normal(size=(2, 3, 4, 2)).astype(np.float32)
  got = layers.resize(jnp.asarray(x), (7, 5), 'bilinear', align_corners=True)
  np.testing.assert_allclose(got, _np_resize_align_corners(x, 7, 5),
                             atol=1e-6)
  # 2x2 -> 3x3: the centre is the mean of the four corners.
  sq = np.arange(4, dtype=np.float32).reshape(1, 2, 2, 1)
  got = layers.resize(jnp.asarray(sq), (3, 3), 'bilinear', align_corners=True)
  assert got[0, 1, 1, 0] == pytest.approx(1.5)
  np.testing.assert_array_equal(got[0, ::2, ::2, 0], sq[0, :, :, 0])


def test_segmentation_loss_with_low_resolution_aux():
  logits, labels = _batch(seed=6, shape=(2, 7, 9))
  rng = np.random.default_rng(7)
  aux0 = rng.normal(size=(2, 4, 5, 4)).astype(np.float32)
  aux1 = rng.normal(size=(2, 7, 9, 4)).astype(np.float32)
  out = SegmentationOutput(logits=logits, aux=(aux0, aux1))
  total, terms = jax.jit(lambda o, l: losses.segmentation_loss(
      o, l, aux_weights=(0.4, 0.16), main_weight=0.5))(out, labels)
  main = _np_cross_entropy(logits, labels)
  a0 = _np_cross_entropy(_np_resize_align_corners(aux0, 7, 9), labels)
  a1 = _np_cross_entropy(aux1, labels)
  assert terms['main'] == pytest.approx(main, rel=1e-5)
  assert terms['aux_0'] == pytest.approx(a0, rel=1e-5)
  assert terms['aux_1'] == pytest.approx(a1, rel=1e-5)
  assert total == pytest.approx(0.5 * main + 0.4 * a0 + 0.16 * a1, rel=1e-5)
  assert terms['total'] == total


def test_segmentation_loss_errors():
  logits, labels = _batch()
  out = SegmentationOutput(logits=logits, aux=(logits,))
  with pytest.raises(ValueError, match='loss.aux_weights has 0 weights'):
    losses.segmentation_loss(out, labels)
  with pytest.raises(ValueError, match='loss.name'):
    losses.segmentation_loss(out, labels, loss_name='dice', aux_weights=(1,))
  with pytest.raises(ValueError, match='loss.bootstrap_k'):
    losses.segmentation_loss(out, labels, aux_weights=(1,),
                             loss_name='bootstrapped_cross_entropy')


def _loss_config(**overrides):
  cfg = ml_collections.ConfigDict(dict(
      name='cross_entropy', ignore_index=255, class_weights=None,
      aux_weights=(), bootstrap_k=0))
  cfg.update(overrides)
  return cfg


def test_loss_fn_from_config():
  logits, labels = _batch(seed=8)
  out = SegmentationOutput(logits=logits, aux=(logits * 2,))
  fn = losses.loss_fn_from_config(_loss_config(
      name='bootstrapped_cross_entropy', bootstrap_k=7, aux_weights=(0.4,),
      class_weights=[1.0, 2.0, 1.0, 1.0]))
  total, terms = jax.jit(fn)(out, labels)
  w = [1.0, 2.0, 1.0, 1.0]
  want = (_np_bootstrapped(logits, labels, 7, weights=w)
          + 0.4 * _np_bootstrapped(logits * 2, labels, 7, weights=w))
  assert total == pytest.approx(want, rel=1e-5)
  assert set(terms) == {'main', 'aux_0', 'total'}
  # ignore_index is honoured: ignoring class 1 changes the plain CE.
  fn = losses.loss_fn_from_config(_loss_config(ignore_index=1,
                                               aux_weights=(0.0,)))
  want = _np_cross_entropy(logits, labels, ignore_index=1)
  assert fn(out, labels)[0] == pytest.approx(want, rel=1e-5)


def test_loss_fn_from_config_errors():
  with pytest.raises(ValueError, match='loss.name'):
    losses.loss_fn_from_config(_loss_config(name='focal'))
  with pytest.raises(ValueError, match='loss.bootstrap_k'):
    losses.loss_fn_from_config(_loss_config(name='bootstrapped_cross_entropy'))
  cfg = _loss_config()
  cfg.gamma = 2.0
  with pytest.raises(ValueError, match='loss.gamma'):
    losses.loss_fn_from_config(cfg)
