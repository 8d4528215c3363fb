"""Tests of PSPNet, its Caffe-style ResNet blocks and pyramid pooling, and
its converter (tiny widths; eval_shape for the full networks).

The parity test against pytorch-semseg runs when PTSEMSEG_SRC names a
pytorch-semseg work tree and PTSEMSEG_PYTHON a python with torch (oracle:
shared/tools/ptsemseg_oracle.py beside the repository, or PTSEMSEG_ORACLE).
"""
import functools
import math

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semseg_jax import convert
from semseg_jax.convert import pspnet as psp_convert
from semseg_jax.models import get_model
from semseg_jax.models.backbones import psp_resnet
from testing_utils import abstract_apply
from testing_utils import assert_matches_oracle
from testing_utils import model_config
from testing_utils import noise_variables
from testing_utils import oracle_dump
from testing_utils import param_count
from testing_utils import train_losses

KEY = jax.random.key(0, impl='rbg')  # fast to compile on CPU
# 64 -> 2 channels, 2048 -> 64; one block per stage.
TINY = {'width_mult': 1 / 32, 'block_config': (1, 1, 1, 1)}


def _shapes(model, hw, batch=1, train=False):
  return abstract_apply(model, hw, train=train, batch=batch)


# --------------------------------------------------------------- the network


@pytest.mark.parametrize('k,kw,count', [
    # pytorch-semseg pspnet(): 'pascal' (ResNet-101), 'cityscapes', 'ade20k'.
    (21, {}, 68_073_706),
    (19, {}, 68_072_166),
    (150, {'block_config': (3, 4, 6, 3)}, 49_180_908),
    # GroupNorm in the pyramid: the same scale/bias, no statistics.
    (21, {'pool_norm': 'group'}, 68_073_706),
    # No norm: 4 branches lose BN scale+bias (2 x 512) and gain a conv bias.
    (21, {'pool_norm': 'none'}, 68_073_706 - 4 * 512),
])
def test_parameter_counts(k, kw, count):
  v, out = _shapes(get_model('pspnet', k, **kw), (64, 64))
  assert param_count(v['params']) == count
  assert out.logits.shape == (1, 64, 64, k)


def test_pool_norm_options_change_the_pyramid_only():
  v, _ = _shapes(get_model('pspnet', 3, pool_norm='group', **TINY), (32, 32))
  assert set(v['params']['pyramid_pooling']['path_3']) == {'conv', 'gn'}
  assert 'pyramid_pooling' not in v['batch_stats']
  assert 'bn' in v['params']['cbr_final']
  v, _ = _shapes(get_model('pspnet', 3, **TINY), (32, 32))
  assert set(v['batch_stats']['pyramid_pooling']['path_3']) == {'bn'}


@pytest.mark.parametrize('hw', [(1, 1), (37, 53), (64, 48)])
def test_logits_at_input_resolution_and_aux_in_training(hw):
  model = get_model('pspnet', 5, **TINY)
  _, out = _shapes(model, hw, batch=2)
  assert out.logits.shape == (2, *hw, 5) and out.logits.dtype == jnp.float32
  assert out.aux == ()
  _, out = _shapes(model, hw, batch=2, train=True)
  assert out.logits.shape == (2, *hw, 5)
  # Output stride 8: three ceil-halvings (conv1_1, max-pool, res_block3).
  h8 = tuple(-(-n // 8) for n in hw)
  assert [a.shape for a in out.aux] == [(2, *h8, 5)]
  assert out.aux[0].dtype == jnp.float32


def test_dilated_stages_keep_output_stride_8():
  x = jax.ShapeDtypeStruct((1, 97, 65, 3), jnp.float32)
  model = get_model('pspnet', 3, **TINY)
  v = jax.eval_shape(lambda x: model.init(KEY, x, train=False), x)
  inter = jax.eval_shape(lambda v, x: model.apply(
      v, x, train=False, capture_intermediates=True)[1], v, x)['intermediates']
  shape = lambda name: inter[name]['__call__'][0].shape
  assert shape('stem') == (1, 25, 17, 4)  # 97 -> 49 -> 25
  assert shape('res_block3') == (1, 13, 9, 16)
  assert shape('res_block4') == (1, 13, 9, 32)
  assert shape('res_block5') == (1, 13, 9, 64)
  assert shape('pyramid_pooling') == (1, 13, 9, 64 + 4 * 16)


def test_bfloat16_compute_float32_params_and_logits():
  v, out = _shapes(get_model('pspnet', 3, dtype=jnp.bfloat16, **TINY),
                   (32, 32), train=True)
  assert {p.dtype for p in jax.tree.leaves(v)} == {jnp.dtype(jnp.float32)}
  assert out.logits.dtype == out.aux[0].dtype == jnp.float32


def test_bad_options():
  with pytest.raises(ValueError, match="pool_mode must be one of"):
    _shapes(get_model('pspnet', 3, pool_mode='max', **TINY), (32, 32))
  with pytest.raises(ValueError, match="pool_norm must be one of"):
    _shapes(get_model('pspnet', 3, pool_norm='layer', **TINY), (32, 32))
  with pytest.raises(ValueError, match='block_config must give 4 stages'):
    _shapes(get_model('pspnet', 3, width_mult=1 / 32, block_config=(1, 1)),
            (32, 32))
  with pytest.raises(ValueError, match='NHWC'):
    model = get_model('pspnet', 3, **TINY)
    jax.eval_shape(lambda: model.init(KEY, jnp.zeros((32, 32, 3)),
                                      train=False))
  # Upstream's pooling needs a 6x6 map at 1/8 (input >= 41).
  with pytest.raises(ValueError, match=r"pool_mode='floor'.*at least 6 "
                     r'pixels, got 5'):
    _shapes(get_model('pspnet', 3, pool_mode='floor', **TINY), (40, 64))
  _shapes(get_model('pspnet', 3, pool_mode='floor', **TINY), (41, 64))


def test_train_needs_dropout_rng():
  model = get_model('pspnet', 3, **TINY)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  v = jax.eval_shape(lambda x: model.init(KEY, x, train=False), x)
  with pytest.raises(Exception, match='dropout'):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=True,
                                            mutable=['batch_stats']), v, x)


# ---------------------------------------------------------- pyramid pooling


def _np_adaptive(x, bins):
  """AdaptiveAvgPool2d, straight from torch's definition (float64)."""
  _, h, w, _ = x.shape
  out = np.zeros((x.shape[0], bins, bins, x.shape[3]))
  for i in range(bins):
    r0, r1 = math.floor(i * h / bins), math.ceil((i + 1) * h / bins)
    for j in range(bins):
      c0, c1 = math.floor(j * w / bins), math.ceil((j + 1) * w / bins)
      out[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
  return out


def _np_avg_pool(x, k, s):
  """F.avg_pool2d(kernel=k, stride=s, padding=0), k and s (h, w) pairs."""
  _, h, w, _ = x.shape
  oh, ow = (h - k[0]) // s[0] + 1, (w - k[1]) // s[1] + 1
  out = np.zeros((x.shape[0], oh, ow, x.shape[3]))
  for i in range(oh):
    for j in range(ow):
      out[:, i, j] = x[:, i * s[0]:i * s[0] + k[0],
                       j * s[1]:j * s[1] + k[1]].mean(axis=(1, 2))
  return out


def _np_resize_ac(x, hw):
  """Bilinear, align_corners=True (float64)."""
  for axis, n_out in ((1, hw[0]), (2, hw[1])):
    n_in = x.shape[axis]
    src = (np.arange(n_out) * ((n_in - 1) / (n_out - 1)) if n_out > 1
           else np.zeros(1))
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    wt = (src - i0).reshape([-1 if a == axis else 1 for a in range(4)])
    x = np.take(x, i0, axis) * (1 - wt) + np.take(x, i1, axis) * wt
  return x


def test_adaptive_windows_known_cases():
  # torch.nn.AdaptiveAvgPool1d(3) over 5 values averages [0:2], [1:4], [3:5].
  assert psp_resnet.adaptive_windows(5, 3) == [(0, 2), (1, 4), (3, 5)]
  assert psp_resnet.adaptive_windows(1, 6) == [(0, 1)] * 6
  assert psp_resnet.adaptive_windows(12, 6) == [(2 * i, 2 * i + 2)
                                                for i in range(6)]
  # Upstream's int(n / b): 9 pixels, 6 bins -> kernel 1, nine outputs.
  assert psp_resnet.floor_windows(9, 6) == [(i, i + 1) for i in range(9)]
  assert psp_resnet.floor_windows(13, 2) == [(0, 6), (6, 12)]
  # ICNet's 33-row map with kernel 8, stride 5 -> 6 windows.
  assert psp_resnet.strided_windows(33, 8, 5)[-1] == (25, 33)
  with pytest.raises(ValueError, match='does not fit'):
    psp_resnet.strided_windows(20, 33, 33)


@pytest.mark.parametrize('hw,bins', [((7, 11), 6), ((60, 60), 6), ((13, 9), 3),
                                     ((3, 5), 6), ((1, 4), 2), ((10, 10), 1)])
def test_adaptive_avg_pool_matches_numpy(hw, bins):
  x = np.random.default_rng(0).standard_normal((2, *hw, 3)).astype(np.float32)
  y = jax.jit(psp_resnet.adaptive_avg_pool, static_argnums=1)(x, bins)
  np.testing.assert_allclose(np.asarray(y), _np_adaptive(x, bins), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize('fusion', ['cat', 'sum'])
@pytest.mark.parametrize('mode,hw', [('adaptive', (9, 13)),
                                     ('floor', (9, 13)), ('floor', (17, 6))])
def test_pyramid_pooling_matches_numpy(fusion, mode, hw):
  x = np.random.default_rng(1).standard_normal((2, *hw, 4)).astype(np.float32)
  pp = psp_resnet.PyramidPooling(fusion=fusion, pool_mode=mode, convs='none')
  y = np.asarray(jax.jit(lambda x: pp.apply({}, x, train=False))(x))
  branches = []
  for b in (6, 3, 2, 1):
    if mode == 'adaptive':
      pooled = _np_adaptive(x, b)
    else:  # upstream: kernel = stride = int(n / b)
      k = (int(hw[0] / b), int(hw[1] / b))
      pooled = _np_avg_pool(x, k, k)
    branches.append(_np_resize_ac(pooled, hw))
  ref = (np.concatenate([x] + branches, -1) if fusion == 'cat'
         else x + sum(branches))
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_floor_and_adaptive_pooling_agree_on_divisible_maps():
  # 60 (PSPNet at 473) and 12 divide by 6, 3, 2, 1; 9 does not.
  r = np.random.default_rng(2)
  for n, same in ((12, True), (9, False)):
    x = jnp.asarray(r.standard_normal((1, n, n, 2)).astype(np.float32))
    ya, yf = (jax.jit(functools.partial(
        psp_resnet.PyramidPooling(pool_mode=m, convs='none').apply, {},
        train=False))(x) for m in ('adaptive', 'floor'))
    assert np.allclose(np.asarray(ya), np.asarray(yf), atol=1e-5) == same, n


def test_pyramid_branch_conv_bn_relu_and_explicit_windows():
  # Branch i: avg-pool -> 1x1 conv (no bias) -> BN (eval) -> ReLU -> resize.
  x = np.random.default_rng(3).standard_normal((1, 33, 65, 8)).astype(
      np.float32)
  pp = psp_resnet.PyramidPooling()
  v = jax.jit(functools.partial(pp.init, train=False))(KEY, x)
  assert v['params']['path_0']['conv']['kernel'].shape == (1, 1, 8, 2)
  windows = (((8, 15), (5, 10)), ((13, 25), (10, 20)), ((17, 33), (16, 32)),
             ((33, 65), (33, 65)))
  y = np.asarray(jax.jit(functools.partial(
      pp.apply, train=False, windows=windows))(v, x))
  assert y.shape == (1, 33, 65, 8 + 4 * 2)
  for i, (k, s) in enumerate(windows):
    p = v['params'][f'path_{i}']
    pooled = _np_avg_pool(x, k, s)
    assert pooled.shape[1:3] == ((6, 6), (3, 3), (2, 2), (1, 1))[i]
    z = pooled @ np.asarray(p['conv']['kernel'][0, 0])
    z = (z - 0.0) / np.sqrt(1.0 + 1e-5) * np.asarray(p['bn']['scale']) + \
        np.asarray(p['bn']['bias'])  # fresh statistics: mean 0, var 1
    ref = _np_resize_ac(np.maximum(z, 0), (33, 65))
    np.testing.assert_allclose(y[..., 8 + 2 * i:10 + 2 * i], ref, rtol=1e-4,
                               atol=1e-5)


def test_group_norm_groups():
  assert psp_resnet.group_norm_groups(512) == 32
  assert psp_resnet.group_norm_groups(16) == 8
  assert psp_resnet.group_norm_groups(2) == 1
  assert psp_resnet.group_norm_groups(1) == 1
  assert psp_resnet.group_norm_groups(6) == 3


# ------------------------------------------------------------------ training


@pytest.mark.parametrize('pool_norm', ['batch', 'group', 'none'])
def test_batch_of_one_pyramid_gradients(pool_norm):
  # Batch 1 gives the 1x1 bin's BatchNorm one value per channel (torch
  # raises). Ours stays finite: the branch outputs its BN bias, so its conv
  # gets no gradient; GroupNorm or no norm train that branch too.
  x = jax.random.normal(jax.random.key(2), (1, 7, 7, 8))
  pp = psp_resnet.PyramidPooling(norm=pool_norm)
  v = jax.jit(functools.partial(pp.init, train=False))(KEY, x)
  w = jax.random.normal(jax.random.key(3), (1, 7, 7, 16))

  def loss_fn(params):
    y, upd = pp.apply({**v, 'params': params}, x, train=True,
                      mutable=['batch_stats'])
    return jnp.sum(y * w), upd

  g, upd = jax.jit(jax.grad(loss_fn, has_aux=True))(v['params'])
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(g))
  g1 = np.abs(np.asarray(g['path_3']['conv']['kernel'])).max()
  g6 = np.abs(np.asarray(g['path_0']['conv']['kernel'])).max()
  assert g6 > 0
  if pool_norm == 'batch':
    assert g1 == 0
    # Running variance moved towards the batch variance, 0.
    np.testing.assert_allclose(upd['batch_stats']['path_3']['bn']['var'],
                               0.9, rtol=1e-6)
  else:
    assert g1 > 0


def test_tiny_pspnet_trains_with_batch_of_one_and_aux_loss():
  # The trainer on `shapes`: batch 1, default BatchNorm in the pyramid.
  config = model_config(
      {'name': 'pspnet', 'width_mult': 1 / 16, 'block_config': (1, 1, 1, 1)},
      **{'loss.aux_weights': (0.4,), 'optimizer.learning_rate': 0.05,
         'batch_size': 1, 'num_train_steps': 6})
  got = train_losses(config, 6)
  assert got[-1] < 0.7 * got[0], got


# ----------------------------------------------------------------- converter


def _upstream_stage_keys(name, n_blocks):
  keys = set()
  for i in range(n_blocks):
    subs = ('cbr1', 'cbr2', 'cb3', 'cb4') if i == 0 else ('cbr1', 'cbr2',
                                                          'cb3')
    for s in subs:
      unit = 'cbr_unit' if s.startswith('cbr') else 'cb_unit'
      keys |= _bn_unit_keys(f'{name}.layers.{i}.{s}.{unit}')
  return keys


def _bn_unit_keys(prefix):
  return {f'{prefix}.0.weight'} | {
      f'{prefix}.1.{s}' for s in ('weight', 'bias', 'running_mean',
                                  'running_var', 'num_batches_tracked')}


def _upstream_pspnet_keys(blocks):
  keys = set()
  for name in ('convbnrelu1_1', 'convbnrelu1_2', 'convbnrelu1_3', 'cbr_final',
               'convbnrelu4_aux'):
    keys |= _bn_unit_keys(f'{name}.cbr_unit')
  for i in range(4):
    keys |= _bn_unit_keys(f'pyramid_pooling.path_module_list.{i}.cbr_unit')
  for s, n in zip((2, 3, 4, 5), blocks):
    keys |= _upstream_stage_keys(f'res_block{s}', n)
  return keys | {f'{c}.{s}' for c in ('classification', 'aux_cls')
                 for s in ('weight', 'bias')}


@pytest.mark.parametrize('arch,blocks,n_keys', [
    # len(state_dict()) of upstream's pspnet() / pspnet(version='ade20k').
    ('pspnet', (3, 4, 23, 3), 676), ('pspnet_ade20k', (3, 4, 6, 3), 370)])
def test_round_trip_and_upstream_names(arch, blocks, n_keys):
  model = get_model('pspnet', 5, width_mult=1 / 32, block_config=blocks)
  v = noise_variables(model, (48, 48))
  sd = convert.to_ptsemseg(v, arch)
  assert set(sd) == _upstream_pspnet_keys(blocks) and len(sd) == n_keys
  w = sd['res_block4.layers.0.cbr2.cbr_unit.0.weight']  # torch OIHW
  np.testing.assert_array_equal(
      w, np.asarray(v['params']['res_block4']['layers_0']['cbr2']['conv'][
          'kernel']).transpose(3, 2, 0, 1))
  module, back = convert.from_ptsemseg(sd, arch, width_mult=1 / 32)
  assert module.pool_mode == 'floor' and tuple(module.block_config) == blocks
  assert module.num_classes == 5
  fa, fb = (traverse_util.flatten_dict(dict(t)) for t in (v, back))
  assert set(fa) == set(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]))


def test_wrong_depth_is_reported():
  model = get_model('pspnet', 3, width_mult=1 / 32, block_config=(3, 4, 6, 3))
  sd = convert.to_ptsemseg(noise_variables(model, (48, 48)), 'pspnet_ade20k')
  with pytest.raises(ValueError, match=r"missing key 'res_block4.layers.6"):
    convert.from_ptsemseg(sd, 'pspnet', width_mult=1 / 32)


def test_caffe_names_match_upstream_loader():
  names = psp_convert.pspnet_caffe_names((3, 4, 23, 3))
  assert names['conv4_24'] == 'convbnrelu4_aux.cbr_unit'
  assert names['conv3_1_1x1_proj'] == 'res_block3.layers.0.cb4.cb_unit'
  assert names['conv4_23_1x1_increase'] == 'res_block4.layers.22.cb3.cb_unit'
  assert names['conv5_3_pool6_conv'] == (
      'pyramid_pooling.path_module_list.0.cbr_unit')
  assert names['conv5_3_pool1_conv'] == (
      'pyramid_pooling.path_module_list.3.cbr_unit')
  # 3 stem + 4 pool + conv5_4 + aux + 2 classifiers; a stage of n blocks
  # has 4 + 3 (n - 1) convs.
  assert len(names) == 11 + sum(3 * n + 1 for n in (3, 4, 23, 3))


def test_caffe_blobs_convert_to_a_loadable_state_dict():
  # A tiny "caffemodel": blobs in Caffe order, BN blobs shaped [1, C, 1, 1].
  blocks = (1, 2, 1, 1)
  model = get_model('pspnet', 3, width_mult=1 / 32, block_config=blocks)
  sd = convert.to_ptsemseg(noise_variables(model, (48, 48)), 'pspnet')
  blobs = {}
  for caffe, prefix in psp_convert.pspnet_caffe_names(blocks).items():
    conv = prefix + '.0' if prefix.endswith('_unit') else prefix
    blobs[caffe] = [sd[f'{conv}.weight']] + (
        [sd[f'{conv}.bias']] if f'{conv}.bias' in sd else [])
    if f'{prefix}.1.weight' in sd:
      blobs[f'{caffe}/bn'] = [sd[f'{prefix}.1.{s}'].reshape(1, -1, 1, 1)
                              for s in ('weight', 'bias', 'running_mean',
                                        'running_var')]
  got = psp_convert.pspnet_from_caffe(blobs, blocks)
  want = {k: a for k, a in sd.items() if not k.endswith('num_batches_tracked')}
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  np.testing.assert_array_equal(got['res_block3.layers.1.cb3.cb_unit.1.'
                                    'running_var'],
                                blobs['conv3_2_1x1_increase/bn'][3].ravel())
  convert.from_ptsemseg(got, 'pspnet', width_mult=1 / 32, block_config=blocks)
  with pytest.raises(ValueError, match="missing Caffe layer 'conv6_1'"):
    psp_convert.pspnet_from_caffe(
        {k: b for k, b in blobs.items() if k != 'conv6_1'}, blocks)
  with pytest.raises(ValueError, match="'fc7' maps to no upstream module"):
    psp_convert.pspnet_from_caffe(dict(blobs, fc7=[np.zeros(1)]), blocks)


# ------------------------------------------------- parity with pytorch-semseg


@pytest.mark.parametrize('arch,h,w', [
    # 1/8 maps 9x13 (upstream's int(n/b) pooling differs from adaptive
    # there) and 6x8; upstream's own 473x473 was checked by hand (report).
    ('pspnet', 65, 97), ('pspnet_ade20k', 41, 57)])
def test_parity_with_pytorch_semseg(arch, h, w, tmp_path):
  sd, x, ref = oracle_dump(arch, h, w, tmp_path)  # ~270 MB
  module, variables = convert.from_ptsemseg(sd, arch)
  del sd
  assert_matches_oracle(module, variables, x, ref)
