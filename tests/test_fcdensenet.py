"""Tests of FC-DenseNet 56/67/103 (eval_shape for the paper's networks, a
narrow two-pooling network for numerics and training)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fcdensenet as fcdensenet_config
from semseg_jax import config as config_lib
from semseg_jax import train
from semseg_jax.models import get_model
from testing_utils import abstract_apply
from testing_utils import model_config
from testing_utils import param_count
from testing_utils import train_losses

KEY = jax.random.key(0, impl='rbg')  # fast to compile on CPU
# Narrow network: 2 poolings, growth 4, 8 first maps, 2 layers per block.
TINY = dict(layers_per_block=(2, 2, 2, 2, 2), growth_rate=4,
            first_conv_features=8)
# Smaller still (1 pooling, 1 layer per block) where only one block matters.
MINI = dict(layers_per_block=(1, 1, 1), growth_rate=4, first_conv_features=8)


def _shapes(model, hw, c=3, b=1):
  return abstract_apply(model, hw, batch=b, channels=c)


def _reference_count(blocks, growth, first=48, classes=11, c_in=3):
  """Trainable parameters of the authors' Lasagne network, by hand: convs
  with biases, BN scale + shift, transition-up deconvs of the new maps."""
  n_pool = len(blocks) // 2
  dense = lambda m: 2 * m + 9 * m * growth + growth  # BN + 3x3 conv
  total = 9 * c_in * first + first
  m, skips = first, []
  for i in range(n_pool):
    for _ in range(blocks[i]):
      total, m = total + dense(m), m + growth
    skips.append(m)
    total += 2 * m + m * m + m  # transition down: BN + 1x1 conv
  for _ in range(blocks[n_pool]):
    total, m = total + dense(m), m + growth
  new = blocks[n_pool] * growth
  for i in range(n_pool):
    total += 9 * new * new + new  # transition up keeps the width
    m = new + skips[-1 - i]
    for _ in range(blocks[n_pool + 1 + i]):
      total, m = total + dense(m), m + growth
    new = blocks[n_pool + 1 + i] * growth
  return total + m * classes + classes, m


@pytest.mark.parametrize('name,blocks,growth,count,paper', [
    ('fcdensenet56', (4,) * 11, 12, 1_376_795, 1.5e6),
    ('fcdensenet67', (5,) * 11, 16, 3_463_243, 3.5e6),
    ('fcdensenet103', (4, 5, 7, 10, 12, 15, 12, 10, 7, 5, 4), 16, 9_322_091,
     9.4e6),
])
def test_parameter_counts(name, blocks, growth, count, paper):
  model = get_model(name, 11)
  assert tuple(model.layers_per_block) == blocks
  assert model.growth_rate == growth
  v, out = _shapes(model, (64, 64))
  ref, last_width = _reference_count(blocks, growth)
  assert param_count(v['params']) == ref == count
  assert v['params']['classifier']['kernel'].shape == (1, 1, last_width, 11)
  # The authors' Lasagne summary counts every parameter value, BatchNorm
  # statistics included; so counted, 67 and 103 are within 1% of the paper
  # (3,502,923 and 9,425,163). FC-DenseNet56 comes to 1.40M: the paper's
  # "1.5M" cannot be met by the architecture it describes.
  lasagne_count = count + param_count(v['batch_stats'])
  if name != 'fcdensenet56':
    assert abs(lasagne_count / paper - 1) < 0.01
  assert out.logits.shape == (1, 64, 64, 11)


def test_stack_widths_follow_the_authors_readme():
  # README of SimJeg/FC-DenseNet: the 103's stack is 896 maps after the
  # bottleneck, 1088 after the first up block, then 816, ... (each up block
  # = skip + upsampled new maps + its own new maps).
  v, _ = _shapes(get_model('fcdensenet103', 11), (32, 32))
  p = v['params']
  assert p['bottleneck']['layer14']['conv']['kernel'].shape == (3, 3, 880, 16)
  # A transition up sees only the 15 x 16 new bottleneck maps.
  assert p['transition_up0']['deconv']['kernel'].shape == (3, 3, 240, 240)
  inputs = [p[f'up_block{i}']['layer0']['conv']['kernel'].shape[2]
            for i in range(5)]
  lasts = [inputs[i] + 16 * n for i, n in enumerate((12, 10, 7, 5, 4))]
  assert inputs == [656 + 240, 464 + 192, 304 + 160, 192 + 112, 112 + 80]
  assert lasts == [1088, 816, 576, 384, 256]


@pytest.mark.parametrize('hw', [(32, 32), (33, 47), (61, 32), (100, 75)])
def test_logits_at_input_resolution_any_size(hw):
  _, out = _shapes(get_model('fcdensenet56', 5), hw)
  assert out.logits.shape == (1, *hw, 5)
  assert out.logits.dtype == jnp.float32 and out.aux == ()


def test_size_rule_and_bad_options():
  with pytest.raises(ValueError, match=r'needs H, W >= 32 \(2 \*\* n_pool\), '
                     r'got 31x64'):
    _shapes(get_model('fcdensenet103', 11), (31, 64))
  with pytest.raises(ValueError, match='needs H, W >= 4'):
    _shapes(get_model('fcdensenet103', 11, **TINY), (3, 9))
  with pytest.raises(ValueError, match='2 \\* n_pool \\+ 1'):
    _shapes(get_model('fcdensenet103', 11, layers_per_block=(4, 4)), (32, 32))
  with pytest.raises(ValueError, match="no option 'n_pool'"):
    get_model('fcdensenet67', 11, n_pool=4)


@functools.lru_cache(maxsize=None)
def _tiny(batch_stats_at_eval=False, dropout_rate=0.2, size='tiny'):
  model = get_model('fcdensenet103', 3, batch_stats_at_eval=batch_stats_at_eval,
                    dropout_rate=dropout_rate,
                    **(TINY if size == 'tiny' else MINI))
  v = jax.jit(lambda x: model.init(KEY, x, train=False))(
      jnp.zeros((1, 9, 11, 3)))
  return model, v


def _np_transposed_conv(x, w, s):
  """No-padding transposed conv by scatter-add: x [H, W, I], w [k, k, I, O]."""
  h, wd, _ = x.shape
  k = w.shape[0]
  out = np.zeros(((h - 1) * s + k, (wd - 1) * s + k, w.shape[3]))
  for i in range(h):
    for j in range(wd):
      out[i * s:i * s + k, j * s:j * s + k] += np.einsum('c,uvco->uvo',
                                                         x[i, j], w)
  return out


def test_transition_up_matches_numpy_reference_at_odd_sizes():
  # 9x11 input: skips 9x11 and 4x5, bottleneck 2x2. Each transition up is a
  # 3x3/2 valid transposed conv of the previous block's new maps (2h + 1),
  # cropped to the skip's top-left and concatenated before it.
  model, v = _tiny()
  x = jax.random.normal(jax.random.key(1), (1, 9, 11, 3))
  names = ('bottleneck', 'up_block0', 'down_block0', 'down_block1',
           'transition_up0', 'transition_up1')
  out, st = jax.jit(lambda v, x: model.apply(
      v, x, train=False, capture_intermediates=lambda m, _: m.name in names))(
          v, x)
  inter = {n: st['intermediates'][n]['__call__'][0] for n in names}
  p = v['params']
  for tu, (block, skip) in (('transition_up0', ('bottleneck', 'down_block1')),
                            ('transition_up1', ('up_block0', 'down_block0'))):
    new = np.asarray(inter[block][1][0])
    skip_map = np.asarray(inter[skip][0][0])
    up = _np_transposed_conv(new, np.asarray(p[tu]['deconv']['kernel']), 2)
    up = up[:skip_map.shape[0], :skip_map.shape[1]] + np.asarray(
        p[tu]['deconv']['bias'])
    ref = np.concatenate([up, skip_map], axis=-1)
    np.testing.assert_allclose(np.asarray(inter[tu][0]), ref, rtol=1e-4,
                               atol=1e-5)
  assert inter['bottleneck'][1].shape == (1, 2, 2, 8)  # only the new maps
  assert out.logits.shape == (1, 9, 11, 3)


def test_dense_layer_is_bn_relu_conv_with_elementwise_dropout():
  model, v = _tiny(size='mini')
  x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
  is_drop = lambda m, _: isinstance(m, nn.Dropout)

  @jax.jit
  def run(key):
    out, st = model.apply(v, x, train=True, mutable=['batch_stats'],
                          capture_intermediates=is_drop,
                          rngs={'dropout': key})
    return out.logits, st['intermediates']

  logits_a, inter = run(jax.random.key(3))
  y = np.asarray(inter['down_block0']['layer0']['Dropout_0']['__call__'][0])
  zero = y == 0
  # Element-wise (not channel-wise) dropout at rate 0.2.
  assert 0.15 < zero.mean() < 0.25
  assert not (zero.all(axis=(1, 2))).any()
  logits_b, _ = run(jax.random.key(4))
  assert not np.allclose(np.asarray(logits_a), np.asarray(logits_b))
  # Eval: the first dense layer is conv3x3(ReLU(BN(stack))) with the initial
  # statistics (mean 0, var 1, epsilon 1e-4), zero padding, and the block
  # appends it after its input.
  names = ('first_conv', 'layer0', 'down_block0')
  inter = jax.jit(lambda x: model.apply(
      v, x, train=False, capture_intermediates=lambda m, _: m.name in names)[1])(
          x)['intermediates']
  stack = np.asarray(inter['first_conv']['__call__'][0])
  block = inter['down_block0']
  conv = v['params']['down_block0']['layer0']['conv']
  a = np.pad(np.maximum(stack / np.sqrt(1 + 1e-4), 0),
             ((0, 0), (1, 1), (1, 1), (0, 0)))
  k = np.asarray(conv['kernel'])
  ref = sum(np.einsum('bhwc,cd->bhwd', a[:, i:i + 16, j:j + 16], k[i, j])
            for i in range(3) for j in range(3)) + np.asarray(conv['bias'])
  np.testing.assert_allclose(np.asarray(block['layer0']['__call__'][0]), ref,
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(block['__call__'][0][0]),
                             np.concatenate([stack, ref], -1), rtol=1e-4,
                             atol=1e-5)


def test_batch_stats_at_eval_is_the_papers_test_protocol():
  # Default eval: running averages, so one image's logits do not depend on
  # the rest of the batch. batch_stats_at_eval: normalised by the batch
  # itself, i.e. the train-mode computation without dropout, and the
  # running averages stay untouched.
  x = jax.random.normal(jax.random.key(6), (2, 16, 16, 3))
  xs = jnp.stack([x, x.at[1].multiply(3.0)])
  model, v = _tiny(size='mini')
  paper, _ = _tiny(batch_stats_at_eval=True, size='mini')
  no_drop, _ = _tiny(dropout_rate=0.0, size='mini')
  evaluate = lambda m: jax.jit(jax.vmap(
      lambda x: m.apply(v, x, train=False).logits))
  e = evaluate(model)(xs)
  np.testing.assert_allclose(np.asarray(e[0, 0]), np.asarray(e[1, 0]),
                             atol=1e-6)
  p = evaluate(paper)(xs)
  assert not np.allclose(np.asarray(p[0, 0]), np.asarray(p[1, 0]), atol=1e-3)
  t, st = jax.jit(lambda x: no_drop.apply(
      v, x, train=True, mutable=['batch_stats', 'intermediates'],
      capture_intermediates=lambda m, _: m.name == 'first_conv'))(x)
  np.testing.assert_allclose(np.asarray(p[0]), np.asarray(t.logits),
                             rtol=1e-5, atol=1e-5)
  # Train mode moved the running mean by (1 - 0.9) of the batch mean (from
  # 0); eval mode, even with batch statistics, cannot change it.
  first = np.asarray(st['intermediates']['first_conv']['__call__'][0])
  np.testing.assert_allclose(
      np.asarray(st['batch_stats']['down_block0']['layer0']['bn']['mean']),
      0.1 * first.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  _, upd = jax.jit(lambda x: paper.apply(v, x, train=False,
                                         mutable=['batch_stats']))(x)
  for a, b in zip(jax.tree.leaves(upd), jax.tree.leaves(v['batch_stats'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_compute_float32_params_and_logits():
  v, out = _shapes(get_model('fcdensenet56', 4, dtype=jnp.bfloat16, **TINY),
                   (16, 16))
  assert {p.dtype for p in jax.tree.leaves(v)} == {jnp.dtype(jnp.float32)}
  assert out.logits.dtype == jnp.float32


@pytest.mark.parametrize('arg,name', [(None, 'fcdensenet103'),
                                      ('56', 'fcdensenet56'),
                                      ('67', 'fcdensenet67'),
                                      ('103', 'fcdensenet103')])
def test_config_builds_the_papers_network(arg, name):
  config = fcdensenet_config.get_config(arg)
  config.lock()
  config_lib.validate_config(config)
  model = train.create_model(config)
  assert config.model.name == name and model.num_classes == 11
  assert config.dataset.name == 'camvid'
  reference = get_model(name, 11)
  for field in ('layers_per_block', 'growth_rate', 'first_conv_features',
                'dropout_rate', 'batch_stats_at_eval'):
    assert getattr(model, field) == getattr(reference, field), field


def test_config_rejects_unknown_variant():
  with pytest.raises(ValueError, match="takes 56, 67 or 103, got '57'"):
    fcdensenet_config.get_config('57')


def test_tiny_network_trains_on_shapes():
  config = model_config(
      {'name': 'fcdensenet103', 'layers_per_block': (2, 2, 2), 'growth_rate': 6,
       'first_conv_features': 8},
      **{'optimizer.name': 'adam', 'optimizer.learning_rate': 3e-3,
         'optimizer.weight_decay': 0.0, 'schedule.name': 'constant'})
  losses = train_losses(config, 10)
  assert losses[-1] < 0.7 * losses[0], losses
