"""Tests of DeepLabV3+ (tiny widths; eval_shape for the full-size network)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import deeplabv3plus as deeplab_config
from semseg_jax import config as config_lib
from semseg_jax import train
from semseg_jax.models import get_model
from semseg_jax.models.backbones.resnet import ResNet
from semseg_jax.models.deeplabv3plus import ASPP
from semseg_jax.models.deeplabv3plus import default_atrous_rates
from testing_utils import abstract_apply
from testing_utils import model_config
from testing_utils import param_count
from testing_utils import train_losses

KEY = jax.random.key(0, impl='rbg')  # fast to compile on CPU
TINY = dict(resnet_depth=18, width_mult=1 / 16)  # ResNet 4..32, ASPP 16, low 3


def _shapes(model, hw, train=False, b=1):
  return abstract_apply(model, hw, train=train, batch=b)


def _init(model, hw, b=1):
  return jax.jit(lambda x: model.init(KEY, x, train=False))(
      jnp.zeros((b, *hw, 3)))


def _eval(model, v, x):
  return jax.jit(lambda v, x: model.apply(v, x, train=False).logits)(v, x)


def _train_fn(model):
  """Jitted ``(v, x, seed) -> (train-mode logits, updated batch_stats)``."""
  def f(v, x, seed):
    out, upd = model.apply(v, x, train=True, mutable=['batch_stats'],
                           rngs={'dropout': jax.random.key(seed, impl='rbg')})
    return out.logits, upd['batch_stats']
  return jax.jit(f)


def _head_count(k, c_low=256, c_high=2048, aspp=256, low=48, dec=256):
  """Parameters of ASPP + decoder + classifier, from the paper's layer list
  (BatchNorm scale and bias per conv, no conv biases before BatchNorm)."""
  bn = lambda c: 2 * c
  aspp_count = (2 * (c_high * aspp + bn(aspp))  # image pooling, 1x1
                + 3 * (9 * c_high * aspp + bn(aspp))  # rates 6, 12, 18
                + 5 * aspp * aspp + bn(aspp))  # projection of the concat
  decoder = (c_low * low + bn(low) + 9 * (aspp + low) * dec + bn(dec)
             + 9 * dec * dec + bn(dec) + dec * k + k)
  return aspp_count + decoder


@pytest.mark.parametrize('depth,backbone,total', [
    (101, 42_500_160, 59_344_309),  # 59.34M, as commonly quoted.
    (50, 23_508_032, 40_352_181),
])
def test_parameter_count(depth, backbone, total):
  v, out = _shapes(get_model('deeplabv3plus', 21, resnet_depth=depth),
                   (65, 65))
  counts = {name: param_count(t) for name, t in v['params'].items()}
  assert counts['backbone'] == backbone
  assert sum(counts.values()) == total == backbone + _head_count(21)
  assert out.logits.shape == (1, 65, 65, 21)


def test_parameters_do_not_depend_on_output_stride():
  # Train at output stride 16, evaluate at 8 (the paper's protocol).
  trees = [jax.tree.map(lambda a: a.shape,
                        _shapes(get_model('deeplabv3plus', 4,
                                          output_stride=os, **TINY),
                                (40, 40))[0])
           for os in (8, 16, 32)]
  assert trees[0] == trees[1] == trees[2]
  model8 = get_model('deeplabv3plus', 4, output_stride=8, **TINY)
  model16 = get_model('deeplabv3plus', 4, output_stride=16, **TINY)
  x = jax.random.normal(jax.random.key(1), (1, 40, 40, 3))
  v = _init(model16, (40, 40))
  y16 = _eval(model16, v, x)
  y8 = _eval(model8, v, x)
  assert y8.shape == y16.shape == (1, 40, 40, 4)
  assert not np.allclose(y8, y16)  # different dilations, same variables


def test_default_atrous_rates():
  assert default_atrous_rates(16) == (6, 12, 18)
  assert default_atrous_rates(8) == (12, 24, 36)
  assert default_atrous_rates(32) == (3, 6, 9)
  with pytest.raises(ValueError, match='output_stride must be one of'):
    default_atrous_rates(4)


@pytest.mark.parametrize('hw', [(37, 53), (33, 33), (16, 20), (1, 1)])
@pytest.mark.parametrize('output_stride', [8, 16])
def test_logits_at_input_resolution(hw, output_stride):
  model = get_model('deeplabv3plus', 5, output_stride=output_stride, **TINY)
  _, out = _shapes(model, hw)
  assert out.logits.shape == (1, *hw, 5) and out.logits.dtype == jnp.float32
  assert out.aux == ()
  _, out = _shapes(model, hw, train=True, b=2)
  assert out.logits.shape == (2, *hw, 5) and out.aux == ()


def _np_conv(x, k, dilation=1):
  """'Same' dilated correlation of NHWC ``x`` with HWIO ``k`` (odd size)."""
  kh, kw = k.shape[:2]
  ph, pw = dilation * (kh // 2), dilation * (kw // 2)
  h, w = x.shape[1:3]
  xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  out = 0.0
  for u in range(kh):
    for v in range(kw):
      du, dv = u * dilation, v * dilation
      patch = xp[:, du:du + h, dv:dv + w]
      out = out + np.einsum('bhwc,co->bhwo', patch, k[u, v])
  return out


def test_aspp_matches_numpy_reference():
  # Running statistics (0, 1) and BN scale 1 / bias 0 in eval mode: each
  # BatchNorm divides by sqrt(1 + 1e-5).
  aspp = ASPP(features=3, rates=(2, 3, 5))
  x = np.random.default_rng(0).standard_normal((2, 9, 11, 4)).astype(np.float32)
  v = aspp.init(KEY, jnp.asarray(x), train=False)
  y = np.asarray(aspp.apply(v, jnp.asarray(x), train=False))
  p = jax.tree.map(np.asarray, v['params'])
  s = 1 / np.sqrt(1 + 1e-5)
  relu = lambda a: np.maximum(a, 0)
  k = lambda name: p[name]['conv']['kernel'].astype(np.float64)
  pooled = relu(_np_conv(x.mean(axis=(1, 2), keepdims=True),
                         k('image_pool')) * s)
  branches = [np.broadcast_to(pooled, (2, 9, 11, 3)),
              relu(_np_conv(x, k('aspp0')) * s)]
  branches += [relu(_np_conv(x, k(f'aspp{i}'), r) * s)
               for i, r in enumerate((2, 3, 5), start=1)]
  ref = relu(_np_conv(np.concatenate(branches, -1), k('projection')) * s)
  assert set(p) == {'image_pool', 'aspp0', 'aspp1', 'aspp2', 'aspp3',
                    'projection'}
  assert p['aspp3']['conv']['kernel'].shape == (3, 3, 4, 3)
  assert 'bias' not in p['aspp1']['conv']  # no bias before BatchNorm
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


def test_decoder_fuses_stride4_features():
  # Widths at width 1/16: low-level 1x1 conv 16 -> 3, decoder (16 + 3) -> 16.
  v, _ = _shapes(get_model('deeplabv3plus', 5, **TINY), (64, 64))
  p = v['params']
  assert p['low_level']['conv']['kernel'].shape == (1, 1, 4, 3)  # layer1: 4
  assert p['decoder_conv1']['conv']['kernel'].shape == (3, 3, 16 + 3, 16)
  assert p['decoder_conv2']['conv']['kernel'].shape == (3, 3, 16, 16)
  assert p['classifier']['kernel'].shape == (1, 1, 16, 5)
  assert 'bias' in p['classifier']


def test_freeze_bn_and_dropout():
  x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  frozen = get_model('deeplabv3plus', 3, freeze_bn=True, dropout_rate=0.0,
                     **TINY)
  v = _init(frozen, (32, 32), b=2)
  logits, stats = _train_fn(frozen)(v, x, 0)
  # Frozen: running statistics are used and left unchanged.
  np.testing.assert_allclose(logits, _eval(frozen, v, x), rtol=1e-5,
                             atol=1e-6)
  assert jax.tree.all(jax.tree.map(np.array_equal, stats, v['batch_stats']))
  # Dropout still follows `train` when BatchNorm is frozen.
  dropped = get_model('deeplabv3plus', 3, freeze_bn=True, dropout_rate=0.5,
                      **TINY)
  run = _train_fn(dropped)
  assert not np.allclose(run(v, x, 0)[0], run(v, x, 1)[0])
  # Unfrozen, training moves every running statistic.
  _, stats = _train_fn(get_model('deeplabv3plus', 3, **TINY))(v, x, 0)
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), stats,
                       v['batch_stats'])
  assert all(jax.tree.leaves(moved))


def test_bad_options_raise_clear_errors():
  with pytest.raises(ValueError, match='output_stride must be one of'):
    _shapes(get_model('deeplabv3plus', 2, output_stride=4, **TINY), (32, 32))
  with pytest.raises(ValueError, match='atrous_rates must be positive'):
    _shapes(get_model('deeplabv3plus', 2, atrous_rates=(6, 0), **TINY),
            (32, 32))
  with pytest.raises(ValueError, match='depth must be one of'):
    _shapes(get_model('deeplabv3plus', 2, resnet_depth=42), (32, 32))
  with pytest.raises(ValueError, match='NHWC'):
    get_model('deeplabv3plus', 2, **TINY).init(KEY, jnp.zeros((32, 32, 3)),
                                                train=False)
  with pytest.raises(ValueError, match="no option 'aspp_rates'"):
    get_model('deeplabv3plus', 2, aspp_rates=(1,))


def test_explicit_rates_and_multi_grid_build():
  model = get_model('deeplabv3plus', 2, atrous_rates=(1, 2), multi_grid=(1, 2),
                    **TINY)
  v, out = _shapes(model, (32, 32))
  assert 'aspp3' not in v['params']['aspp']
  assert v['params']['aspp']['projection']['conv']['kernel'].shape == (
      1, 1, 4 * 16, 16)
  assert out.logits.shape == (1, 32, 32, 2)


def test_bfloat16_compute_float32_params_and_logits():
  model = get_model('deeplabv3plus', 3, dtype=jnp.bfloat16, **TINY)
  v, out = _shapes(model, (32, 32))
  assert {p.dtype for p in jax.tree.leaves(v)} == {jnp.dtype(jnp.float32)}
  assert out.logits.dtype == jnp.float32


@pytest.mark.parametrize('arg,name,k,crop,lr', [
    (None, 'voc2012', 21, (513, 513), 0.007),
    ('cityscapes', 'cityscapes', 19, (769, 769), 0.01),
])
def test_configs_follow_the_paper(arg, name, k, crop, lr):
  config = deeplab_config.get_config(arg)
  config_lib.validate_config(config)
  assert (config.dataset.name, config.num_classes) == (name, k)
  assert tuple(config.dataset.image_size) == crop
  assert config.optimizer.learning_rate == lr
  assert (config.batch_size, config.schedule.name, config.schedule.power) == (
      16, 'poly', 0.9)
  assert config.optimizer.weight_decay == 1e-4
  assert config.model.output_stride == 16
  model = train.create_model(config)
  v, _ = _shapes(model, (65, 65))
  assert param_count(v['params']) == 42_500_160 + _head_count(k)
  with pytest.raises(ValueError, match="takes 'voc' or 'cityscapes'"):
    deeplab_config.get_config('camvid')


def test_tiny_network_trains():
  config = model_config(
      {'name': 'deeplabv3plus', **TINY},
      **{'optimizer.name': 'adam', 'optimizer.learning_rate': 3e-3,
         'optimizer.weight_decay': 0.0, 'schedule.name': 'constant'})
  losses = train_losses(config, 20)  # One repeated batch: must be fitted.
  assert losses[-1] < 0.7 * losses[0], losses
