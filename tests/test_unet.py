"""Tests of the U-Net (tiny feature_scale; eval_shape for the full network)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from semseg_jax.models import get_model
from testing_utils import abstract_apply
from testing_utils import param_count

KEY = jax.random.key(0, impl='rbg')  # fast to compile on CPU


def _shapes(model, hw, c=3):
  return abstract_apply(model, hw, batch=2, channels=c)


def _init(model, hw, c=3):
  x = jnp.zeros((1, *hw, c))
  return jax.jit(lambda x: model.init(KEY, x, train=False))(x)


@pytest.mark.parametrize('padding', ['valid', 'same', 'tile'])
def test_upstream_parameter_count(padding):
  # pytorch-semseg unet(n_classes=21), feature_scale 4: 1,943,429 params
  # (BatchNorm scale/bias included, running statistics not).
  hw = (188, 204) if padding == 'valid' else (64, 64)
  v, _ = _shapes(get_model('unet', 21, padding=padding), hw)
  assert param_count(v['params']) == 1_943_429
  # Encoder only: 5 blocks x 2 BatchNorms x (mean, var), 16..256 channels.
  assert param_count(v['batch_stats']) == 2 * 2 * (16 + 32 + 64 + 128 + 256)


@pytest.mark.parametrize('hw,out', [((188, 188), (4, 4)),
                                    ((204, 252), (20, 68)),
                                    ((572, 572), (388, 388))])
def test_valid_mode_returns_centre_region(hw, out):
  _, o = _shapes(get_model('unet', 21, padding='valid'), hw)
  assert o.logits.shape == (2, *out, 21)


@pytest.mark.parametrize('hw', [(190, 188), (172, 172), (188, 200)])
def test_valid_mode_size_rule(hw):
  with pytest.raises(ValueError, match=r'12 \(mod 16\) and >= 188'):
    _shapes(get_model('unet', 21, padding='valid'), hw)


@pytest.mark.parametrize('padding,hw', [('same', (128, 128)),
                                        ('same', (37, 53)),
                                        ('same', (16, 16)), ('tile', (37, 53)),
                                        ('tile', (5, 200))])
def test_logits_at_input_resolution(padding, hw):
  _, o = _shapes(get_model('unet', 6, feature_scale=16, padding=padding), hw)
  assert o.logits.shape == (2, *hw, 6)
  assert o.logits.dtype == jnp.float32 and o.aux == ()


def test_same_mode_too_small_and_bad_options():
  with pytest.raises(ValueError, match='>= 16'):
    _shapes(get_model('unet', 2, feature_scale=16), (15, 32))
  with pytest.raises(ValueError, match='padding must be one of'):
    _shapes(get_model('unet', 2, padding='reflect'), (32, 32))
  with pytest.raises(ValueError, match='in_channels=1'):
    _shapes(get_model('unet', 2, in_channels=1), (32, 32), c=3)
  _, o = _shapes(get_model('unet', 2, feature_scale=16, in_channels=1),
                 (32, 32), c=1)
  assert o.logits.shape == (2, 32, 32, 2)


def test_tile_mode_is_valid_mode_on_mirrored_input():
  # 'tile' = valid network on the input mirror-padded to a legal size.
  x = jax.random.normal(jax.random.key(1), (1, 20, 36, 3))
  tile = get_model('unet', 3, feature_scale=16, padding='tile')
  valid = get_model('unet', 3, feature_scale=16, padding='valid')
  v = _init(tile, (20, 36))
  y = jax.jit(lambda v, x: tile.apply(v, x, train=False).logits)(v, x)
  # 20 + 184 = 204 and 36 + 184 = 220 are legal (12 mod 16): no extra pad.
  xp = np.pad(np.asarray(x), ((0, 0), (92, 92), (92, 92), (0, 0)), 'reflect')
  ref = jax.jit(lambda v, x: valid.apply(v, x, train=False).logits)(v, xp)
  assert ref.shape == y.shape == (1, 20, 36, 3)
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-5)


def test_same_mode_odd_sizes_pad_the_upsampled_map():
  # 37 -> 18 -> 9 -> 4 -> 2 after pooling; the decoder must still line up.
  model = get_model('unet', 3, feature_scale=16)
  x = jax.random.normal(jax.random.key(2), (1, 37, 53, 3))
  v = _init(model, (37, 53))
  y = jax.jit(lambda v, x: model.apply(v, x, train=False).logits)(v, x)
  assert y.shape == (1, 37, 53, 3) and np.isfinite(np.asarray(y)).all()


def test_options_change_the_parameter_tree():
  v, _ = _shapes(get_model('unet', 3, feature_scale=16, is_batchnorm=False),
                 (32, 32))
  assert 'batch_stats' not in v
  assert set(v['params']['conv1']['conv1']) == {'conv'}
  v, o = _shapes(get_model('unet', 3, feature_scale=16, is_deconv=False),
                 (32, 32))
  assert 'up' not in v['params']['up_concat1']
  # Bilinear upsampling keeps 8 channels: the conv sees 4 + 8 (upstream's
  # unetConv2(in_size=8) would crash here).
  assert v['params']['up_concat1']['conv']['conv1']['conv']['kernel'].shape == (
      3, 3, 12, 4)
  assert o.logits.shape == (2, 32, 32, 3)
  # Decoder blocks never have BatchNorm, as upstream.
  v, _ = _shapes(get_model('unet', 3, feature_scale=16), (32, 32))
  assert set(v['batch_stats']) == {'conv1', 'conv2', 'conv3', 'conv4',
                                   'center'}


def test_bfloat16_compute_float32_params_and_logits():
  model = get_model('unet', 3, feature_scale=16, dtype=jnp.bfloat16)
  v, o = _shapes(model, (32, 32))
  assert {p.dtype for p in jax.tree.leaves(v)} == {jnp.dtype(jnp.float32)}
  assert o.logits.dtype == jnp.float32


def test_tiny_unet_learns_a_batch():
  # The quickstart's configuration: a few Adam steps fit one batch.
  model = get_model('unet', 2, feature_scale=16)
  r = np.random.default_rng(0)
  x = r.standard_normal((4, 32, 32, 3)).astype(np.float32)
  yy, xx = np.mgrid[:32, :32]
  labels = np.broadcast_to(((yy - 16) ** 2 + (xx - 16) ** 2 < 100), (4, 32, 32))
  x[..., 0] += 2 * labels  # the class is visible in channel 0
  labels = jnp.asarray(labels, jnp.int32)
  v = _init(model, (32, 32))
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, stats, opt, x):
    def loss_fn(p):
      out, upd = model.apply({'params': p, 'batch_stats': stats}, x,
                             train=True, mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(
          out.logits, labels).mean(), upd['batch_stats']
    (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), stats, opt, loss

  params, stats, opt = v['params'], v['batch_stats'], tx.init(v['params'])
  losses = []
  for _ in range(40):
    params, stats, opt, loss = step(params, stats, opt, x)
    losses.append(float(loss))
  assert losses[-1] < 0.25 * losses[0], losses
  # Running statistics moved away from their (0, 1) initial values.
  assert np.abs(np.asarray(stats['conv1']['conv1']['bn']['mean'])).max() > 0
  pred = model.apply({'params': params, 'batch_stats': stats}, x,
                     train=False).logits.argmax(-1)
  acc = (np.asarray(pred) == np.asarray(labels)).mean()
  assert acc > 0.93  # majority class alone gives 0.69
