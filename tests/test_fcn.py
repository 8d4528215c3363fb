"""Tests of FCN-32s/16s/8s and the VGG16 trunk (tiny widths; eval_shape for
full-size networks)."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semseg_jax.models import get_model
from semseg_jax.models import layers
from semseg_jax.models.backbones import VGG16
from testing_utils import param_count

TINY = 1 / 32  # 64 -> 2 channels, fc 4096 -> 128


def _shapes(model, hw, k=21):
  x = jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32)
  v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                     x)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), v, x)
  return v, out


@pytest.mark.parametrize('name,upsample,count', [
    # Upstream (pytorch-semseg) parameter counts at 21 classes.
    ('fcn32s', None, 134_346_581),
    ('fcn16s', None, 134_357_354),
    ('fcn8s', None, 134_489_759),
    # fcn8s without its three bias-free transposed convs (4x4, 4x4, 16x16).
    ('fcn8s', 'nearest', 134_489_759 - 21 * 21 * (16 + 16 + 256)),
    # Paper-style learned upsampling for 32s (64x64) and 16s (4x4 + 32x32).
    ('fcn32s', 'learned', 134_346_581 + 21 * 21 * 64 * 64),
    ('fcn16s', 'learned', 134_357_354 + 21 * 21 * (16 + 32 * 32)),
])
def test_parameter_counts(name, upsample, count):
  kw = {} if upsample is None else {'upsample': upsample}
  v, out = _shapes(get_model(name, 21, **kw), (64, 64))
  assert param_count(v['params']) == count
  assert 'batch_stats' not in v
  assert out.logits.shape == (1, 64, 64, 21)


@pytest.mark.parametrize('name', ['fcn32s', 'fcn16s', 'fcn8s'])
@pytest.mark.parametrize('upsample', ['learned', 'nearest', 'bilinear'])
@pytest.mark.parametrize('hw', [(37, 53), (1, 1), (130, 67)])
def test_logits_at_input_resolution(name, upsample, hw):
  _, out = _shapes(get_model(name, 5, upsample=upsample, width_mult=TINY), hw)
  assert out.logits.shape == (1, *hw, 5)
  assert out.logits.dtype == jnp.float32
  assert out.aux == ()


def test_defaults_follow_upstream():
  assert get_model('fcn32s', 3).upsample == 'nearest'
  assert get_model('fcn16s', 3).upsample == 'nearest'
  assert get_model('fcn8s', 3).upsample == 'learned'


def test_vgg_pool_sizes_and_widths():
  x = jax.ShapeDtypeStruct((2, 37, 53, 3), jnp.float32)
  feats = jax.eval_shape(
      lambda x: VGG16(width_mult=0.5).init_with_output(
          jax.random.key(0), x)[0], x)
  h, w = 37 + 198, 53 + 198  # conv1_1 pads by 100, 3x3 kernel
  for b, c in enumerate((32, 64, 128, 256, 256), start=1):
    h, w = math.ceil(h / 2), math.ceil(w / 2)  # ceil_mode pooling
    assert feats[f'pool{b}'].shape == (2, h, w, c)


@functools.lru_cache(maxsize=None)
def _tiny(name, upsample):
  """A tiny network and its initial variables (params are size-independent,
  so one init per configuration serves every test)."""
  model = get_model(name, 4, upsample=upsample, width_mult=TINY)
  x = jnp.zeros((1, 16, 16, 3))
  # An 'rbg' key: threefry's per-shape kernels take ~8 s to compile on CPU.
  key = jax.random.key(0, impl='rbg')
  return model, jax.jit(lambda x: model.init(key, x, train=False))(x)


def test_learned_upsampling_is_bilinear_initialised():
  _, v = _tiny('fcn8s', 'learned')
  assert v['params']['upscore8']['kernel'].shape == (16, 16, 4, 4)
  assert set(v['params']['upscore2']) == {'kernel'}  # no bias, as upstream
  for name, k in (('upscore2', 4), ('upscore4', 4), ('upscore8', 16)):
    np.testing.assert_array_equal(v['params'][name]['kernel'],
                                  layers.bilinear_kernel(k, 4, 4))


def _np_upscore(x, w, s):
  """Transposed conv, no padding, numpy scatter-add: x [H,W,I], w [k,k,I,O]."""
  h, wd, _ = x.shape
  k = w.shape[0]
  out = np.zeros(((h - 1) * s + k, (wd - 1) * s + k, w.shape[3]))
  for i in range(h):
    for j in range(wd):
      out[i * s:i * s + k, j * s:j * s + k] += np.einsum('c,uvco->uvo',
                                                         x[i, j], w)
  return out


def test_fcn8s_learned_head_matches_numpy_reference():
  # Upstream: upscore2(score) + score_pool4[5:], upscore4(.) +
  # score_pool3[9:], upscore8(.)[31:31+H]. Random upscore kernels so that a
  # wrong crop offset or fusion order shows.
  x = jax.random.normal(jax.random.key(1), (1, 21, 27, 3))
  model, v = _tiny('fcn8s', 'learned')
  params = dict(v['params'])
  r = np.random.default_rng(0)
  for name, k in (('upscore2', 4), ('upscore4', 4), ('upscore8', 16)):
    params[name] = {'kernel': r.standard_normal((k, k, 4, 4)).astype(
        np.float32) / k}
  keep = ('score_fr', 'score_pool4', 'score_pool3')
  y, st = model.apply({'params': params}, x, train=False,
                      capture_intermediates=lambda m, _: m.name in keep)
  sc = {n: np.asarray(st['intermediates'][n]['__call__'][0][0]) for n in keep}
  up = _np_upscore(sc['score_fr'], params['upscore2']['kernel'], 2)
  up = up + sc['score_pool4'][5:5 + up.shape[0], 5:5 + up.shape[1]]
  up = _np_upscore(up, params['upscore4']['kernel'], 2)
  up = up + sc['score_pool3'][9:9 + up.shape[0], 9:9 + up.shape[1]]
  ref = _np_upscore(up, params['upscore8']['kernel'], 8)[31:31 + 21, 31:31 + 27]
  np.testing.assert_allclose(np.asarray(y.logits[0]), ref, rtol=1e-4,
                             atol=1e-4)


def test_nearest_and_bilinear_differ_but_share_params():
  x = jax.random.normal(jax.random.key(2), (1, 19, 23, 3))
  model_n, v = _tiny('fcn16s', 'nearest')
  model_b = get_model('fcn16s', 4, upsample='bilinear', width_mult=TINY)
  yn = model_n.apply(v, x, train=False).logits
  yb = model_b.apply(v, x, train=False).logits
  assert yn.shape == yb.shape == (1, 19, 23, 4)
  assert not np.allclose(np.asarray(yn), np.asarray(yb))


def test_dropout2d_drops_whole_channels():
  x = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
  model, v = _tiny('fcn32s', 'nearest')
  is_drop = lambda mdl, _: isinstance(mdl, nn.Dropout)

  def first_dropout(train):
    _, st = model.apply(v, x, train=train, capture_intermediates=is_drop,
                        rngs={'dropout': jax.random.key(4)})
    return np.asarray(st['intermediates']['Dropout_0']['__call__'][0])

  kept, ref = first_dropout(True), first_dropout(False)
  per_channel = np.abs(kept).sum(axis=(1, 2))  # [B, C]
  dropped = per_channel == 0
  assert dropped.any() and (~dropped).any()
  mask = ~dropped[:, None, None, :]
  np.testing.assert_allclose(kept, np.where(mask, 2 * ref, 0), rtol=1e-5,
                             atol=1e-6)


def test_train_needs_dropout_rng_and_is_stochastic():
  x = jax.random.normal(jax.random.key(5), (1, 16, 16, 3))
  model, v = _tiny('fcn8s', 'learned')
  with pytest.raises(Exception, match='dropout'):
    model.apply(v, x, train=True)
  a = model.apply(v, x, train=True, rngs={'dropout': jax.random.key(0)})
  b = model.apply(v, x, train=True, rngs={'dropout': jax.random.key(1)})
  assert not np.allclose(np.asarray(a.logits), np.asarray(b.logits))
  e = model.apply(v, x, train=False).logits
  z = get_model('fcn8s', 4, width_mult=TINY, dropout_rate=0.0).apply(
      v, x, train=True, rngs={'dropout': jax.random.key(0)}).logits
  np.testing.assert_allclose(np.asarray(z), np.asarray(e), atol=1e-6)


def test_bfloat16_compute_float32_params_and_logits():
  x = jnp.ones((1, 16, 16, 3))
  model = get_model('fcn8s', 4, width_mult=TINY, dtype=jnp.bfloat16)
  v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                     x)
  assert {p.dtype for p in jax.tree.leaves(v)} == {jnp.dtype(jnp.float32)}
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), v, x)
  assert out.logits.dtype == jnp.float32


def test_bad_options():
  with pytest.raises(ValueError, match="upsample must be one of"):
    _shapes(get_model('fcn8s', 3, upsample='deconv'), (16, 16))
  with pytest.raises(ValueError, match="no option 'learned_billinear'"):
    get_model('fcn8s', 3, learned_billinear=True)
  with pytest.raises(ValueError, match='NHWC'):
    model = get_model('fcn32s', 3, width_mult=TINY)
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((16, 16, 3)),
                                      train=False))
