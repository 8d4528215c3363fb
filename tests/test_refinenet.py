"""Tests of RefineNet (numpy references of its blocks; eval_shape for the
full-size network)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import refinenet as refinenet_config
from semseg_jax import config as config_lib
from semseg_jax import train
from semseg_jax.models import get_model
from semseg_jax.models.refinenet import ChainedResidualPooling
from semseg_jax.models.refinenet import RefineNetBlock
from semseg_jax.models.refinenet import ResidualConvUnit
from testing_utils import abstract_apply
from testing_utils import model_config
from testing_utils import param_count
from testing_utils import train_losses

KEY = jax.random.key(0, impl='rbg')  # fast to compile on CPU
TINY = dict(resnet_depth=18, width_mult=1 / 16)  # ResNet 4..32, paths 32/16


def _shapes(model, hw, train=False, b=1):
  return abstract_apply(model, hw, train=train, batch=b)


def _refine_count(k, backbone=(2048, 1024, 512, 256), widths=(512, 256, 256,
                                                               256), crp=4):
  """Parameters of the four RefineNet blocks and the classifier, from the
  authors' layer list (3x3 convs; only RCUs' first conv and the classifier
  have biases)."""
  rcu = lambda c: 2 * 9 * c * c + c
  total, prev = 0, None
  for c_in, c in zip(backbone, widths):
    total += 9 * c_in * c + 2 * rcu(c)  # adaptation conv + 2 RCUs
    if prev is not None:
      total += 9 * c * c + 9 * prev * c  # fusion convs (fine, coarse)
    total += crp * 9 * c * c + 3 * rcu(c)  # CRP + 3 output RCUs
    prev = c
  return total + 9 * widths[-1] * k + k


@pytest.mark.parametrize('depth,backbone,total', [
    (101, 42_500_160, 118_052_437),  # = DrSleep/refinenet-pytorch's rf101
    (50, 23_508_032, 99_060_309),
    (152, 58_143_808, 133_696_085),
])
def test_parameter_count(depth, backbone, total):
  v, out = _shapes(get_model('refinenet', 21, resnet_depth=depth), (64, 64))
  counts = {name: param_count(t) for name, t in v['params'].items()}
  assert counts['backbone'] == backbone
  assert sum(counts.values()) == total == backbone + _refine_count(21)
  assert out.logits.shape == (1, 64, 64, 21)


def test_crp_stages_option():
  v, _ = _shapes(get_model('refinenet', 21, crp_stages=2), (64, 64))
  assert param_count(v['params']) == 42_500_160 + _refine_count(21, crp=2)
  assert set(v['params']['refine1']['crp']) == {'conv1', 'conv2'}


@pytest.mark.parametrize('hw', [(37, 53), (64, 64), (8, 12), (1, 1)])
def test_logits_at_input_resolution(hw):
  model = get_model('refinenet', 5, **TINY)
  _, out = _shapes(model, hw)
  assert out.logits.shape == (1, *hw, 5) and out.logits.dtype == jnp.float32
  assert out.aux == ()
  _, out = _shapes(model, hw, train=True, b=2)
  assert out.logits.shape == (2, *hw, 5) and out.aux == ()


# ----------------------------------------------------------------------------
# numpy references


def _np_conv3x3(x, k, b=None):
  """'Same' 3x3 correlation of NHWC ``x`` with HWIO ``k``."""
  h, w = x.shape[1:3]
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = sum(np.einsum('bhwc,co->bhwo', xp[:, u:u + h, v:v + w], k[u, v])
            for u in range(3) for v in range(3))
  return out if b is None else out + b


def _np_maxpool5(x):
  h, w = x.shape[1:3]
  xp = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=-np.inf)
  return np.max([xp[:, u:u + h, v:v + w] for u in range(5) for v in range(5)],
                axis=0)


def _np_resize_corners(x, hw):
  """Bilinear, align_corners=True (torch nn.Upsample / TF's resize)."""
  for axis, n_out in ((1, hw[0]), (2, hw[1])):
    n_in = x.shape[axis]
    src = (np.arange(n_out) * (n_in - 1) / (n_out - 1) if n_out > 1
           else np.zeros(1))
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    shape = [1] * 4
    shape[axis] = n_out
    wt = (src - i0).reshape(shape)
    x = np.take(x, i0, axis) * (1 - wt) + np.take(x, i1, axis) * wt
  return x


relu = lambda a: np.maximum(a, 0)


def _np_rcu(p, x):
  y = _np_conv3x3(relu(x), p['conv1']['kernel'], p['conv1']['bias'])
  return x + _np_conv3x3(relu(y), p['conv2']['kernel'])


def _np_crp(p, x, stages):
  top = x
  for i in range(stages):
    top = _np_conv3x3(_np_maxpool5(top), p[f'conv{i + 1}']['kernel'])
    x = x + top
  return x


def _np_block(p, x, coarse, stages):
  x = _np_conv3x3(x, p['dimred']['kernel'])
  x = _np_rcu(p['adapt_rcu2'], _np_rcu(p['adapt_rcu1'], x))
  if coarse is not None:
    x = _np_conv3x3(x, p['fuse_fine']['kernel'])
    coarse = _np_conv3x3(coarse, p['fuse_coarse']['kernel'])
    x = x + _np_resize_corners(coarse, x.shape[1:3])
  x = _np_crp(p['crp'], relu(x), stages)
  for i in (1, 2, 3):
    x = _np_rcu(p[f'out_rcu{i}'], x)
  return x


def _np_params(v):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), v['params'])


def _random_like(v, seed):
  """Replaces zero-initialised biases so that they are exercised too."""
  leaves, tree = jax.tree.flatten(v)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
      tree, [0.3 * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)])


def test_rcu_and_crp_match_numpy():
  x = np.random.default_rng(0).standard_normal((2, 7, 9, 3)).astype(np.float32)
  rcu = ResidualConvUnit(3)
  v = _random_like(rcu.init(KEY, jnp.asarray(x)), 1)
  np.testing.assert_allclose(rcu.apply(v, jnp.asarray(x)),
                             _np_rcu(_np_params(v), x), rtol=1e-4, atol=1e-4)
  assert 'bias' not in v['params']['conv2']
  crp = ChainedResidualPooling(3, stages=3)
  v = _random_like(crp.init(KEY, jnp.asarray(x)), 2)
  np.testing.assert_allclose(crp.apply(v, jnp.asarray(x)),
                             _np_crp(_np_params(v), x, 3), rtol=1e-4,
                             atol=1e-4)


@pytest.mark.parametrize('coarse_hw', [None, (3, 5)])
def test_refinenet_block_matches_numpy(coarse_hw):
  rng = np.random.default_rng(3)
  x = rng.standard_normal((1, 6, 9, 5)).astype(np.float32)
  coarse = (None if coarse_hw is None else
            rng.standard_normal((1, *coarse_hw, 6)).astype(np.float32))
  block = RefineNetBlock(4, crp_stages=2)
  args = (jnp.asarray(x),) if coarse is None else (jnp.asarray(x),
                                                   jnp.asarray(coarse))
  v = _random_like(block.init(KEY, *args), 4)
  y = jax.jit(block.apply)(v, *args)
  ref = _np_block(_np_params(v), x, coarse, 2)
  assert y.shape == (1, 6, 9, 4)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=2e-4)
  assert ('fuse_coarse' in v['params']) == (coarse is not None)


def test_network_wiring_and_freeze_bn():
  model = get_model('refinenet', 3, dropout_rate=0.0, **TINY)
  frozen = get_model('refinenet', 3, dropout_rate=0.0, freeze_bn=True, **TINY)
  x = jax.random.normal(jax.random.key(5), (2, 40, 36, 3))
  v = jax.jit(lambda x: model.init(KEY, x, train=False))(x)
  p = v['params']
  # Widths 512/256 scaled by 1/16; RefineNet-4 has no fusion convs.
  assert p['refine4']['dimred']['kernel'].shape == (3, 3, 32, 32)
  assert 'fuse_coarse' not in p['refine4']
  assert p['refine3']['fuse_coarse']['kernel'].shape == (3, 3, 32, 16)
  assert p['refine1']['dimred']['kernel'].shape == (3, 3, 4, 16)
  assert p['classifier']['kernel'].shape == (3, 3, 16, 3)
  assert set(v['batch_stats']) == {'backbone'}  # no BatchNorm in the path

  def run(m):
    def f(v, x):
      out, upd = m.apply(v, x, train=True, mutable=['batch_stats'],
                         rngs={'dropout': KEY})
      return out.logits, upd['batch_stats']
    return jax.jit(f)(v, x)

  logits, stats = run(frozen)
  ref = jax.jit(lambda v, x: frozen.apply(v, x, train=False).logits)(v, x)
  np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-6)
  assert jax.tree.all(jax.tree.map(np.array_equal, stats, v['batch_stats']))
  _, stats = run(model)
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), stats,
                       v['batch_stats'])
  assert all(jax.tree.leaves(moved))


def test_bad_options_raise_clear_errors():
  with pytest.raises(ValueError, match='crp_stages must be >= 1'):
    _shapes(get_model('refinenet', 2, crp_stages=0, **TINY), (32, 32))
  with pytest.raises(ValueError, match='depth must be one of'):
    _shapes(get_model('refinenet', 2, resnet_depth=42), (32, 32))
  with pytest.raises(ValueError, match='NHWC'):
    get_model('refinenet', 2, **TINY).init(KEY, jnp.zeros((32, 32, 3)),
                                           train=False)
  with pytest.raises(ValueError, match="no option 'output_stride'"):
    get_model('refinenet', 2, output_stride=8)


def test_bfloat16_compute_float32_params_and_logits():
  model = get_model('refinenet', 3, dtype=jnp.bfloat16, **TINY)
  v, out = _shapes(model, (32, 32))
  assert {p.dtype for p in jax.tree.leaves(v)} == {jnp.dtype(jnp.float32)}
  assert out.logits.dtype == jnp.float32


def test_config_follows_the_authors():
  config = refinenet_config.get_config()
  config_lib.validate_config(config)
  assert (config.dataset.name, config.num_classes) == ('voc2012', 21)
  assert (config.batch_size, config.optimizer.learning_rate,
          config.optimizer.momentum, config.optimizer.weight_decay) == (
              1, 5e-4, 0.9, 5e-4)
  assert tuple(config.dataset.scale_range) == (0.7, 1.3)
  v, _ = _shapes(train.create_model(config), (64, 64))
  assert param_count(v['params']) == 118_052_437


def test_tiny_network_trains():
  config = model_config(
      {'name': 'refinenet', **TINY},
      **{'optimizer.name': 'adam', 'optimizer.learning_rate': 3e-3,
         'optimizer.weight_decay': 0.0, 'schedule.name': 'constant'})
  losses = train_losses(config, 10)
  assert losses[-1] < 0.7 * losses[0], losses
