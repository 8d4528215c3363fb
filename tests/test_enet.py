"""Tests of ENet (full width: the network is small; inputs 16-64 px)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import enet as enet_config
from semseg_jax import config as config_lib
from semseg_jax import train
from semseg_jax.models import enet
from semseg_jax.models import get_model
from semseg_jax.models import layers
from testing_utils import abstract_apply
from testing_utils import model_config
from testing_utils import param_count
from testing_utils import train_losses

KEY = jax.random.key(0, impl='rbg')  # fast to compile on CPU
BN_EPS = 1e-3  # Torch SpatialBatchNormalization(n, 1e-3)


def _shapes(model, hw, b=1):
  return abstract_apply(model, hw, batch=b)


def _reference_count(k):
  """Trainable parameters of the authors' Torch ENet, layer by layer."""
  bn = lambda c: 2 * c

  def enc(cin, cout, middle, proj=1):  # conv1 + middle + conv3, BN, PReLU
    i = cout // 4
    return (proj * proj * cin * i + bn(i) + i + middle(i) + bn(i) + i +
            i * cout + bn(cout) + cout)

  regular = lambda i: 9 * i * i + i
  asym = lambda i: 5 * i * i + 5 * i * i + i  # 1x5 (no bias) + 5x1 (bias)

  def dec(cin, cout, up):
    i = cout // 4
    n = cin * i + bn(i) + 9 * i * i + i + bn(i) + i * cout + bn(cout)
    return n + (cin * cout + bn(cout) if up else 0)

  total = 9 * 3 * 13 + 13 + bn(16) + 16  # initial block
  total += enc(16, 64, regular, 2) + 4 * enc(64, 64, regular)
  total += enc(64, 128, regular, 2)
  total += 2 * (6 * enc(128, 128, regular) + 2 * enc(128, 128, asym))
  total += dec(128, 64, True) + 2 * dec(64, 64, False)
  total += dec(64, 16, True) + dec(16, 16, False)
  return total + 16 * k * 4 + k  # fullconv 2x2


def test_parameter_count():
  v, out = _shapes(get_model('enet', 19), (64, 64))
  params, stats = param_count(v['params']), param_count(v['batch_stats'])
  assert params == _reference_count(19) == 364_311
  # The paper's "0.37M" (2 digits): trainable parameters are 364,311 (1.5%
  # below); with the BatchNorm running statistics, 372,663 (0.7% above).
  assert abs((params + stats) / 0.37e6 - 1) < 0.01
  assert out.logits.shape == (1, 64, 64, 19)
  v12, _ = _shapes(get_model('enet', 12), (16, 16))
  assert param_count(v12['params']) == _reference_count(12) == 364_311 - 7 * 65


def test_layer_layout_follows_the_authors_code():
  v, _ = _shapes(get_model('enet', 5), (32, 32))
  p = v['params']
  assert p['initial']['conv']['kernel'].shape == (3, 3, 3, 13)
  assert p['initial']['prelu']['negative_slope'].shape == (16,)
  # Downsampling projection: 2x2 stride-2 conv, no bias.
  assert set(p['bottleneck1_0']['conv1']) == {'kernel'}
  assert p['bottleneck1_0']['conv1']['kernel'].shape == (2, 2, 16, 16)
  assert p['bottleneck2_0']['conv1']['kernel'].shape == (2, 2, 64, 32)
  # Asymmetric pair: 1x5 without bias, then 5x1 with bias.
  for stage in (2, 3):
    for i in (3, 7):
      b = p[f'bottleneck{stage}_{i}']
      assert b['conv2a']['kernel'].shape == (1, 5, 32, 32)
      assert set(b['conv2a']) == {'kernel'}
      assert b['conv2b']['kernel'].shape == (5, 1, 32, 32)
      assert b['conv2b']['bias'].shape == (32,)
  # Decoder: ReLU (no PReLU), shortcut conv only where it upsamples.
  assert 'prelu1' not in p['bottleneck4_1']
  assert 'shortcut_conv' in p['bottleneck4_0']
  assert 'shortcut_conv' not in p['bottleneck4_1']
  assert p['bottleneck5_0']['shortcut_conv']['kernel'].shape == (1, 1, 64, 16)
  assert p['fullconv']['kernel'].shape == (2, 2, 16, 5)
  names = sorted(k for k in p if k.startswith('bottleneck'))
  assert len(names) == 5 + 9 + 8 + 3 + 2


@pytest.mark.parametrize('hw', [(8, 8), (16, 40), (64, 96), (360, 640)])
def test_logits_at_input_resolution(hw):
  _, out = _shapes(get_model('enet', 7), hw)
  assert out.logits.shape == (1, *hw, 7)
  assert out.logits.dtype == jnp.float32 and out.aux == ()


@pytest.mark.parametrize('hw', [(36, 64), (64, 60), (4, 8), (33, 33)])
def test_size_rule(hw):
  with pytest.raises(ValueError, match=r'H and W to be positive multiples '
                     rf'of 8 .* got {hw[0]}x{hw[1]}'):
    _shapes(get_model('enet', 7), hw)


@functools.lru_cache(maxsize=None)
def _init(hw=(16, 24)):
  model = get_model('enet', 4)
  v = jax.jit(lambda x: model.init(KEY, x, train=False))(jnp.zeros((1, *hw, 3)))
  return model, v


def _prelu(x, a):
  return np.where(x >= 0, x, a * x)


def test_initial_block_is_conv_then_pool_concatenated():
  # Zero conv: the first 13 maps are PReLU(BN(0)) = 0, the last 3 are
  # PReLU(BN(maxpool(x))) with the initial (0, 1) statistics.
  x = np.random.default_rng(0).standard_normal((2, 16, 24, 3)).astype(
      np.float32)
  v = jax.jit(lambda x: enet.InitialBlock().init(KEY, x, train=False))(x)
  params = jax.tree.map(np.asarray, v['params'])
  params['conv']['kernel'] = np.zeros_like(params['conv']['kernel'])
  slope = np.linspace(0.1, 0.4, 16).astype(np.float32)
  params['prelu']['negative_slope'] = slope
  y = np.asarray(enet.InitialBlock().apply(
      {'params': params, 'batch_stats': v['batch_stats']}, x, train=False))
  pool = x.reshape(2, 8, 2, 12, 2, 3).max(axis=(2, 4))
  ref = _prelu(pool / np.sqrt(1 + BN_EPS), slope[13:])
  assert y.shape == (2, 8, 12, 16)
  np.testing.assert_allclose(y[..., :13], 0.0, atol=1e-7)
  np.testing.assert_allclose(y[..., 13:], ref, rtol=1e-5, atol=1e-6)


def test_downsampling_shortcut_pools_and_pads_channels():
  # With conv3 zeroed the main branch is 0, so the output is
  # PReLU(maxpool(x) with zero channels appended) and the indices are the
  # pool's argmax.
  x = np.random.default_rng(1).standard_normal((1, 8, 12, 16)).astype(
      np.float32)
  block = enet.EncoderBottleneck(64, 'downsample', dropout_rate=0.0)
  v = block.init(KEY, x, train=False)
  params = jax.tree.map(np.asarray, v['params'])
  params['conv3']['kernel'] = np.zeros_like(params['conv3']['kernel'])
  (y, idx) = block.apply({'params': params, 'batch_stats': v['batch_stats']},
                         x, train=False)
  pool = x.reshape(1, 4, 2, 6, 2, 16).max(axis=(2, 4))
  ref = np.concatenate([_prelu(pool, 0.25), np.zeros((1, 4, 6, 48))], -1)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-6, atol=1e-6)
  _, ref_idx = layers.max_pool_with_argmax(jnp.asarray(x), 2, 2)
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))


def test_upsampling_bottleneck_unpools_to_the_encoder_indices():
  # Main branch zeroed: y = ReLU(unpool(BN(conv1x1(x)))) scattered to the
  # positions the encoder's max-pool chose, zero everywhere else.
  r = np.random.default_rng(2)
  pre = r.standard_normal((1, 8, 12, 6)).astype(np.float32)
  _, idx = layers.max_pool_with_argmax(jnp.asarray(pre), 2, 2)
  x = r.standard_normal((1, 4, 6, 12)).astype(np.float32)
  block = enet.DecoderBottleneck(6)
  v = block.init(KEY, x, idx, (8, 12), train=False)
  params = jax.tree.map(np.asarray, v['params'])
  params['conv3']['kernel'] = np.zeros_like(params['conv3']['kernel'])
  y = np.asarray(block.apply({'params': params,
                              'batch_stats': v['batch_stats']},
                             x, idx, (8, 12), train=False))
  short = np.einsum('bhwc,cd->bhwd', x,
                    params['shortcut_conv']['kernel'][0, 0]) / np.sqrt(
                        1 + BN_EPS)
  ref = np.zeros((1, 96, 6), np.float32)
  flat_idx = np.asarray(idx).reshape(1, 24, 6)
  for c in range(6):
    ref[0, flat_idx[0, :, c], c] = short.reshape(1, 24, 6)[0, :, c]
  ref = np.maximum(ref.reshape(1, 8, 12, 6), 0)
  assert y.shape == (1, 8, 12, 6)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
  # Exactly one position per 2x2 window can be non-zero.
  assert ((y.reshape(1, 4, 2, 6, 2, 6) != 0).sum(axis=(2, 4)) <= 1).all()


def test_spatial_dropout_drops_whole_channels_at_the_papers_rates():
  model, v = _init()
  x = jax.random.normal(jax.random.key(3), (4, 16, 24, 3))
  is_drop = lambda m, _: isinstance(m, nn.Dropout)
  inter = jax.jit(lambda v, x: model.apply(
      v, x, train=True, mutable=['batch_stats'], capture_intermediates=is_drop,
      rngs={'dropout': jax.random.key(4)})[1]['intermediates'])(v, x)
  outputs = {name: np.asarray(inter[name]['Dropout_0']['__call__'][0])
             for name in inter if name.startswith('bottleneck')}
  assert len(outputs) == 5 + 9 + 8  # encoder only; the decoder has none
  dropped = {1: [], 2: []}
  for name, y in outputs.items():
    zero = (y == 0).all(axis=(1, 2))  # [B, C]: whole channels
    np.testing.assert_array_equal(zero, (y == 0).any(axis=(1, 2)))
    dropped[1 if name.startswith('bottleneck1') else 2].append(zero)
  # Stage 1: p = 0.01 over 5 x 4 x 64 channels (~13 expected);
  # afterwards p = 0.1 over 17 x 4 x 128 channels.
  assert 0 < np.mean(dropped[1]) < 0.03
  assert 0.08 < np.mean(dropped[2]) < 0.12


def test_bfloat16_compute_float32_params_and_logits():
  v, out = _shapes(get_model('enet', 4, dtype=jnp.bfloat16), (16, 16))
  assert {p.dtype for p in jax.tree.leaves(v)} == {jnp.dtype(jnp.float32)}
  assert out.logits.dtype == jnp.float32


def test_config_builds_enet_for_cityscapes():
  config = enet_config.get_config()
  config.lock()
  config_lib.validate_config(config)
  model = train.create_model(config)
  assert model.num_classes == 19 and config.dataset.name == 'cityscapes'
  assert tuple(config.dataset.image_size) == (512, 1024)
  assert config.optimizer.name == 'adam'
  assert config.optimizer.learning_rate == 5e-4
  assert config.optimizer.weight_decay == 2e-4
  reference = get_model('enet', 19)
  for field in ('stage1_dropout_rate', 'dropout_rate'):
    assert getattr(model, field) == getattr(reference, field)


def test_class_weights_formula():
  # w = 1 / ln(1.02 + p): rare classes get up to 1 / ln(1.02) = 50.5.
  p = np.array([0.5, 0.3, 0.15, 0.05, 0.0])
  w = enet_config.enet_class_weights(p / p.sum())
  np.testing.assert_allclose(w, 1 / np.log(1.02 + p / p.sum()))
  assert w[-1] == pytest.approx(50.4983, rel=1e-4)
  with pytest.raises(ValueError, match='frequencies'):
    enet_config.enet_class_weights([0.5, -0.1])


def test_enet_trains_on_shapes():
  config = model_config(
      {'name': 'enet'},
      **{'optimizer.name': 'adam', 'optimizer.learning_rate': 5e-3,
         'optimizer.weight_decay': 0.0, 'schedule.name': 'constant'})
  losses = train_losses(config, 10)
  assert losses[-1] < 0.7 * losses[0], losses
