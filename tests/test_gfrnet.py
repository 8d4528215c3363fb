"""Tests of G-FRNet (tiny widths; eval_shape for full-size networks)."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import gfrnet as gfrnet_config
from semseg_jax import train
from semseg_jax.models import get_model
from testing_utils import abstract_apply
from testing_utils import model_config
from testing_utils import param_count
from testing_utils import train_losses

TINY = 1 / 16  # VGG widths 4, 8, 16, 32, 32 and conv6/conv7 64.
_VGG = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))


def _shapes(model, hw, train=False):
  return abstract_apply(model, hw, train=train)


def _expected_params(k, variant, norm):
  """Parameter count from the layer list of the released prototxt."""

  def conv(cin, cout, bn):
    return 9 * cin * cout + cout + (2 * cout if bn else 0)

  total, cin, last = 0, 3, {}
  for block, (n, c) in enumerate(_VGG, start=1):
    for _ in range(n):
      total += conv(cin, c, norm)
      cin = c
    last[block] = c
  total += conv(512, 1024, norm) + conv(1024, 1024, norm)  # conv6, conv7
  total += conv(1024, k, False)  # pred_1
  stages = ((512, 512), (512, 512), (512, 256), (256, 128), (128, 64))
  if variant == 'caffe':
    total += conv(512, k, False)  # pool5 projection, no BN
    total += sum(conv(c, k, True) for _, c in stages)  # shared projections
    total += 5 * 2 * k  # BN after each gate product
  else:
    for deep, shallow in stages:  # both T_f to the shallow width, + m_f
      total += conv(deep, shallow, True) + conv(shallow, shallow, True)
      total += conv(shallow, k, True)
  return total + 5 * conv(2 * k, k, False)  # refinement convs


@pytest.mark.parametrize('variant,k,norm,count', [
    ('caffe', 11, True, 29_194_090),  # CamVid, the released network
    ('caffe', 21, True, 29_493_930),  # VOC
    ('caffe', 11, False, 29_194_090 - 12_544),  # no encoder BatchNorm
    ('paper', 11, True, 40_911_729),
    ('paper', 21, False, None),
])
def test_parameter_counts(variant, k, norm, count):
  model = get_model('gfrnet', k, variant=variant, encoder_norm=norm)
  v, _ = _shapes(model, (64, 64))
  n = param_count(v['params'])
  assert n == _expected_params(k, variant, norm)
  if count is not None:
    assert n == count


def test_camvid_stage_sizes_match_the_released_prototxt():
  # 360x480 -> ceil pools; the prototxt's Interp layers target 23x30 and
  # 45x60, and its first prediction is 12x15.
  _, out = _shapes(get_model('gfrnet', 11), (360, 480), train=True)
  assert out.logits.shape == (1, 360, 480, 11)
  assert [a.shape[1:3] for a in out.aux] == [(12, 15), (23, 30), (45, 60),
                                             (90, 120), (180, 240)]
  assert all(a.dtype == jnp.float32 for a in out.aux)


@pytest.mark.parametrize('variant', ['caffe', 'paper'])
@pytest.mark.parametrize('hw', [(1, 1), (37, 53), (130, 67)])
def test_logits_at_input_resolution_any_size(variant, hw):
  model = get_model('gfrnet', 5, variant=variant, width_mult=TINY)
  _, out = _shapes(model, hw)
  assert out.logits.shape == (1, *hw, 5)
  assert out.logits.dtype == jnp.float32
  assert out.aux == ()
  _, out = _shapes(model, hw, train=True)
  sizes = [hw]
  for _ in range(5):
    sizes.append(tuple(-(-s // 2) for s in sizes[-1]))
  assert [a.shape[1:3] for a in out.aux] == sizes[:0:-1]


# ---------------------------------------------------------------------------
# Numerics of the decoder against a numpy reference.


def _np_conv3x3(x, p):
  """3x3 conv, padding 1: x [H, W, C], p {'kernel' [3,3,C,O], 'bias'}."""
  h, w, _ = x.shape
  xp = np.pad(x, ((1, 1), (1, 1), (0, 0)))
  k = np.asarray(p['kernel'], np.float64)
  out = sum(xp[dy:dy + h, dx:dx + w] @ k[dy, dx]
            for dy in range(3) for dx in range(3))
  return out + np.asarray(p['bias'])


def _np_bn(x, p, s):
  return ((x - np.asarray(s['mean'])) / np.sqrt(np.asarray(s['var']) + 1e-5)
          * np.asarray(p['scale']) + np.asarray(p['bias']))


def _np_up(x, hw):
  """Bilinear, aligned corners (Caffe Interp), written out per axis."""
  for axis, n_out in enumerate(hw):
    n_in = x.shape[axis]
    src = (np.arange(n_out) * (n_in - 1) / (n_out - 1) if n_out > 1
           else np.zeros(1))
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    t = (src - i0).reshape([-1 if a == axis else 1 for a in range(3)])
    x = np.take(x, i0, axis) * (1 - t) + np.take(x, i1, axis) * t
  return x


def _np_pool(x):
  """2x2 stride-2 max-pool rounding up (Caffe)."""
  h, w, _ = x.shape
  xp = np.pad(x, ((0, h % 2), (0, w % 2), (0, 0)), constant_values=-np.inf)
  return xp.reshape(-(-h // 2), 2, -(-w // 2), 2, -1).max(axis=(1, 3))


def _np_decoder(feats, params, stats, variant):
  """All six predictions, coarse to fine, from the encoder features."""
  relu = lambda a: np.maximum(a, 0)
  preds = [_np_conv3x3(feats['conv7'], params['pred_1'])]
  proj = {}
  if variant == 'caffe':
    proj['pool5'] = _np_conv3x3(feats['pool5'], params['pool5_feature'])
  for i, (deep, shallow) in enumerate([('pool5', 'conv5_3'),
                                       ('conv5_3', 'conv4_3'),
                                       ('conv4_3', 'conv3_3'),
                                       ('conv3_3', 'conv2_2'),
                                       ('conv2_2', 'conv1_2')]):
    stage = f's{i + 2}'
    f = feats[shallow]
    hw = f.shape[:2]

    def conv_bn(a, name):
      return _np_bn(_np_conv3x3(a, params[name]['conv']), params[name]['bn'],
                    stats[name]['bn'])

    if variant == 'caffe':
      name = f'{shallow}_feature'
      proj[shallow] = conv_bn(f, name)
      g = proj[shallow] * _np_up(proj[deep], hw)
      g = _np_bn(g, params[f'gate_{stage}_bn'], stats[f'gate_{stage}_bn'])
    else:
      v = relu(conv_bn(feats[deep], f'gate_{stage}_deep'))
      u = relu(conv_bn(f, f'gate_{stage}_shallow'))
      g = conv_bn(u * _np_up(v, hw), f'ru_{stage}_reduce')
    r = _np_up(preds[-1], hw)
    cat = [r, g] if variant == 'caffe' and stage == 's5' else [g, r]
    name = 'prediction' if stage == 's6' else f'pred_{i + 2}'
    preds.append(_np_conv3x3(np.concatenate(cat, -1), params[name]))
  return preds


def _random_variables(shapes, seed):
  """Random variables of the given shapes: He-scaled kernels (activations
  stay O(1) through the encoder), random biases, BN affines and statistics,
  so that a wrong BN or a swapped parameter shows in the outputs."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  r = np.random.default_rng(seed)
  new = []
  for path, leaf in flat:
    key, shape = jax.tree_util.keystr(path), leaf.shape
    if 'kernel' in key:
      a = r.normal(0, math.sqrt(2 / math.prod(shape[:-1])), shape)
    elif 'var' in key:
      a = r.uniform(0.5, 2.0, shape)
    elif 'scale' in key:
      a = r.uniform(0.5, 1.5, shape)
    else:  # biases and BN means
      a = r.normal(0, 0.1, shape)
    new.append(np.asarray(a, np.float32))
  return jax.tree.unflatten(treedef, new)


@functools.lru_cache(maxsize=None)
def _tiny(variant):
  """A tiny network and random variables (no init compile needed)."""
  model = get_model('gfrnet', 3, variant=variant, width_mult=TINY)
  shapes = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
  return model, _random_variables(shapes, {'caffe': 1, 'paper': 2}[variant])


@pytest.mark.parametrize('variant', ['caffe', 'paper'])
def test_decoder_matches_numpy_reference(variant):
  model, v = _tiny(variant)
  params, stats = v['params'], v['batch_stats']
  x = jax.random.normal(jax.random.key(3), (1, 37, 45, 3))
  names = {'encoder'} | {f'pred_{i}' for i in range(1, 6)}
  out, st = jax.jit(lambda p, x: model.apply(
      {'params': p, 'batch_stats': stats}, x, train=False,
      capture_intermediates=lambda m, _: m.name in names))(params, x)
  inter = st['intermediates']
  feats = {n: np.asarray(a[0], np.float64)
           for n, a in inter['encoder']['__call__'][0].items()}
  assert [feats[n].shape[:2] for n in ('conv1_2', 'conv2_2', 'conv3_3',
                                       'conv4_3', 'conv5_3', 'pool5')] == [
                                           (37, 45), (19, 23), (10, 12),
                                           (5, 6), (3, 3), (2, 2)]
  np.testing.assert_allclose(_np_pool(feats['conv5_3']), feats['pool5'],
                             rtol=1e-6)
  for name in ('conv1_2', 'conv5_3', 'conv7'):  # ReLU maps, not all zero
    assert 0.1 < (feats[name] > 0).mean() < 0.9, name
  ref = _np_decoder(feats, params, stats, variant)
  got = [np.asarray(inter[f'pred_{i}']['__call__'][0][0]) for i in range(1, 6)]
  got.append(np.asarray(out.logits[0]))
  for g, r in zip(got, ref, strict=True):
    assert g.shape == r.shape
    np.testing.assert_allclose(g, r, rtol=1e-4,
                               atol=1e-4 * np.abs(r).max())


def test_train_mode_aux_dropout_and_rng():
  model, v = _tiny('caffe')
  x = jax.random.normal(jax.random.key(4), (2, 24, 40, 3))
  names = {f'pred_{i}' for i in range(1, 6)}

  @jax.jit
  def run(key):
    return model.apply(v, x, train=True, rngs={'dropout': key},
                       mutable=['batch_stats', 'intermediates'],
                       capture_intermediates=lambda m, _: m.name in names)

  out, st = run(jax.random.key(0))
  # aux are the stage predictions pred_1 ... pred_5, coarse to fine.
  assert len(out.aux) == 5
  for i, a in enumerate(out.aux, start=1):
    np.testing.assert_array_equal(
        np.asarray(a),
        np.asarray(st['intermediates'][f'pred_{i}']['__call__'][0]))
  assert out.logits.shape == (2, 24, 40, 3)
  # Dropout: a different rng gives different outputs; no rng is an error.
  other, _ = run(jax.random.key(1))
  assert not np.allclose(np.asarray(out.logits), np.asarray(other.logits))
  with pytest.raises(Exception, match='dropout'):
    jax.eval_shape(lambda: model.apply(v, x, train=True,
                                       mutable=['batch_stats']))


def test_bfloat16_compute_float32_params_and_outputs():
  model = get_model('gfrnet', 4, width_mult=TINY, dtype=jnp.bfloat16)
  v, out = _shapes(model, (32, 32), train=True)
  assert {p.dtype for p in jax.tree.leaves(v)} == {jnp.dtype(jnp.float32)}
  assert out.logits.dtype == jnp.float32
  assert {a.dtype for a in out.aux} == {jnp.dtype(jnp.float32)}


def test_bad_options():
  with pytest.raises(ValueError, match='variant must be one of'):
    _shapes(get_model('gfrnet', 3, variant='released', width_mult=TINY),
            (16, 16))
  with pytest.raises(ValueError, match="no option 'gate'"):
    get_model('gfrnet', 3, gate='paper')
  model = get_model('gfrnet', 3, width_mult=TINY)
  with pytest.raises(ValueError, match='NHWC'):
    jax.eval_shape(lambda: model.init(jax.random.key(0),
                                      jnp.zeros((16, 16, 3)), train=False))


@pytest.mark.parametrize('arg,k', [(None, 11), ('camvid', 11), ('voc', 21)])
def test_configs_build_and_weigh_every_stage(arg, k):
  config = gfrnet_config.get_config(arg)
  assert config.num_classes == k
  model = train.create_model(config)
  _, out = _shapes(model, (64, 64), train=True)
  assert len(out.aux) == len(config.loss.aux_weights) == 5
  weights = config.loss.class_weights
  assert weights is None or len(weights) == k
  with pytest.raises(ValueError, match="'camvid' or 'voc'"):
    gfrnet_config.get_config('cityscapes')


def test_trains_with_falling_loss():
  # The loss sums all six stage terms (the coarsest, 1x1 at 32x32, cannot
  # get far below log 6), so it falls by less than a single-output net's.
  config = model_config({'name': 'gfrnet', 'width_mult': TINY},
                        **{'loss.aux_weights': (1.0,) * 5,
                           'num_train_steps': 8})
  losses = train_losses(config, 8)
  assert losses[-1] < 0.85 * losses[0], losses
  assert losses[-1] < min(losses[:3]), losses
