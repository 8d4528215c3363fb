"""Tests of SegNet and its converters (tiny widths; eval_shape for the full
network).

The parity test against pytorch-semseg runs when PTSEMSEG_SRC names a
pytorch-semseg work tree and PTSEMSEG_PYTHON a python with torch (oracle:
shared/tools/ptsemseg_oracle.py beside the repository, or PTSEMSEG_ORACLE).
"""
import os
import pathlib
import subprocess

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semseg_jax import config as config_lib
from semseg_jax import convert
from semseg_jax.convert import segnet as segnet_convert
from semseg_jax.models import get_model
from testing_utils import abstract_apply
from testing_utils import model_config
from testing_utils import param_count
from testing_utils import train_losses

KEY = jax.random.key(0, impl='rbg')  # fast to compile on CPU
TINY = {'width_mult': 1 / 16}  # 64 -> 4, 512 -> 32 channels


def _shapes(model, hw, c=3):
  return abstract_apply(model, hw, channels=c)


def _random_variables(model, hw, seed=0):
  """Variables of ``model`` filled with numpy noise: conv weights ~ 1/sqrt(fan
  in), BN scale in [0.5, 1.5], shifts/means small, variances in [0.5, 1.5]."""
  shapes, _ = _shapes(model, hw)
  r = np.random.default_rng(seed)

  def fill(path, s):
    leaf = path[-1].key
    if leaf == 'kernel':
      return (r.standard_normal(s.shape) /
              np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
    if leaf in ('scale', 'var'):
      return r.uniform(0.5, 1.5, s.shape).astype(np.float32)
    return (0.1 * r.standard_normal(s.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


# ------------------------------------------------------------ numpy reference


def _np_conv3x3(x, kernel, bias):
  """3x3 conv, padding 1: x [B, H, W, I], kernel [3, 3, I, O]."""
  h, w = x.shape[1:3]
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = sum(np.einsum('bhwi,io->bhwo', xp[:, dy:dy + h, dx:dx + w],
                      kernel[dy, dx]) for dy in range(3) for dx in range(3))
  return out + bias


def _np_pool(x, ceil_mode):
  """2x2 max-pool returning (values, flat argmax in the H x W plane); ties
  go to the first element in row-major window order."""
  b, h, w, c = x.shape
  if ceil_mode:
    ho, wo = -(-h // 2), -(-w // 2)
    x = np.pad(x, ((0, 0), (0, 2 * ho - h), (0, 2 * wo - w), (0, 0)),
               constant_values=-np.inf)
  else:
    ho, wo = h // 2, w // 2
    x = x[:, :2 * ho, :2 * wo]
  win = x.reshape(b, ho, 2, wo, 2, c).transpose(0, 1, 3, 5, 2, 4)
  win = win.reshape(b, ho, wo, c, 4)
  arg = win.argmax(-1)
  rows = 2 * np.arange(ho)[None, :, None, None] + arg // 2
  cols = 2 * np.arange(wo)[None, None, :, None] + arg % 2
  return win.max(-1), rows * w + cols


def _np_unpool(y, idx, hw):
  b, _, _, c = y.shape
  out = np.zeros((b, hw[0] * hw[1], c), y.dtype)
  bi, _, _, ci = np.indices(y.shape)
  out[bi.ravel(), idx.ravel(), ci.ravel()] = y.ravel()
  return out.reshape(b, *hw, c)


def _np_segnet(v, x, ceil_mode, final_bn_relu):
  """SegNet's eval-mode forward pass written directly in numpy."""
  p, s = v['params'], v['batch_stats']

  def stack(x, block, n, last_bn_relu=True):
    for i in range(1, n + 1):
      q = p[block][f'conv{i}']
      x = _np_conv3x3(x, q['conv']['kernel'], q['conv']['bias'])
      if i < n or last_bn_relu:
        st = s[block][f'conv{i}']['bn']
        x = (x - st['mean']) / np.sqrt(st['var'] + 1e-5)
        x = np.maximum(x * q['bn']['scale'] + q['bn']['bias'], 0)
    return x

  pools = []
  for block, n in (('down1', 2), ('down2', 2), ('down3', 3), ('down4', 3),
                   ('down5', 3)):
    x = stack(x, block, n)
    hw = x.shape[1:3]
    x, idx = _np_pool(x, ceil_mode)
    pools.append((idx, hw))
  for block, n in (('up5', 3), ('up4', 3), ('up3', 3), ('up2', 2), ('up1', 2)):
    idx, hw = pools.pop()
    x = stack(_np_unpool(x, idx, hw), block, n,
              last_bn_relu=block != 'up1' or final_bn_relu)
  return x


@pytest.mark.parametrize('hw,ceil_mode,final_bn_relu', [
    ((19, 27), True, False),   # odd sizes: ceil pooling pads, unpool crops
    ((35, 33), False, True),   # upstream: floor pooling drops a row/column
])
def test_matches_numpy_reference(hw, ceil_mode, final_bn_relu):
  model = get_model('segnet', 5, ceil_mode=ceil_mode,
                    final_bn_relu=final_bn_relu, **TINY)
  v = _random_variables(model, hw)
  x = np.random.default_rng(1).standard_normal((2, *hw, 3)).astype(np.float32)
  y = jax.jit(lambda v, x: model.apply(v, x, train=False).logits)(v, x)
  np_v = jax.tree.map(lambda a: np.asarray(a, np.float64), v)
  ref = _np_segnet(np_v, x.astype(np.float64), ceil_mode, final_bn_relu)
  assert y.shape == ref.shape == (2, *hw, 5)
  np.testing.assert_allclose(np.asarray(y), ref,
                             atol=1e-4 * np.abs(ref).max(), rtol=0)
  if final_bn_relu:  # upstream's "logits" went through a ReLU
    assert np.asarray(y).min() >= 0
  else:
    assert np.asarray(y).min() < 0


# ---------------------------------------------------------- shapes and sizes


@pytest.mark.parametrize('kwargs,count', [
    # pytorch-semseg segnet(n_classes=21): 29,455,167 parameters.
    ({'final_bn_relu': True, 'ceil_mode': False}, 29_455_167),
    # Default: the last layer is a plain conv (no BN scale/bias on 21 maps).
    ({}, 29_455_167 - 2 * 21),
])
def test_upstream_parameter_count(kwargs, count):
  v, out = _shapes(get_model('segnet', 21, **kwargs), (64, 96))
  assert param_count(v['params']) == count
  bn_channels = (2 * 64 + 2 * 128 + 3 * 256 + 6 * 512  # encoder
                 + 5 * 512 + 3 * 256 + 2 * 128 + 2 * 64)  # decoder
  if kwargs:
    bn_channels += 21
  assert param_count(v['batch_stats']) == 2 * bn_channels
  assert out.logits.shape == (1, 64, 96, 21)


@pytest.mark.parametrize('hw', [(1, 1), (5, 7), (37, 53), (64, 64)])
def test_ceil_mode_logits_at_input_resolution(hw):
  _, out = _shapes(get_model('segnet', 3, **TINY), hw)
  assert out.logits.shape == (1, *hw, 3)
  assert out.logits.dtype == jnp.float32 and out.aux == ()


def test_floor_mode_size_rule_and_bad_input():
  _, out = _shapes(get_model('segnet', 3, ceil_mode=False, **TINY), (33, 47))
  assert out.logits.shape == (1, 33, 47, 3)
  with pytest.raises(ValueError, match=r'needs H, W >= 32 .* got 31x64'):
    _shapes(get_model('segnet', 3, ceil_mode=False, **TINY), (31, 64))
  with pytest.raises(ValueError, match='in_channels=4'):
    _shapes(get_model('segnet', 3, in_channels=4, **TINY), (32, 32))
  v, out = _shapes(get_model('segnet', 3, in_channels=1, **TINY), (32, 32),
                   c=1)
  assert v['params']['down1']['conv1']['conv']['kernel'].shape == (3, 3, 1, 4)


def test_bfloat16_compute_float32_params_and_logits():
  v, out = _shapes(get_model('segnet', 3, dtype=jnp.bfloat16, **TINY),
                   (32, 32))
  assert {a.dtype for a in jax.tree.leaves(v)} == {jnp.dtype(jnp.float32)}
  assert out.logits.dtype == jnp.float32


# ------------------------------------------------------------------ training


def test_trains_on_shapes():
  config = model_config({'name': 'segnet', 'width_mult': 1 / 16},
                        **{'optimizer.name': 'adam',
                           'optimizer.learning_rate': 1e-2,
                           'optimizer.weight_decay': 0.0,
                           'schedule.name': 'constant'})
  losses = train_losses(config, 10)
  assert losses[-1] < 0.7 * losses[0], losses


def test_config_builds_the_paper_network():
  config = config_lib.load_config('segnet')
  assert config.model.name == 'segnet' and config.num_classes == 11
  assert config.dataset.name == 'camvid'
  assert tuple(config.dataset.image_size) == (360, 480)
  assert len(config.loss.class_weights) == 11
  reference = get_model('segnet', 11)
  options = {k: v for k, v in config.model.items() if k != 'name'}
  assert options == {f: getattr(reference, f) for f in options}
  assert set(options) == {'in_channels', 'width_mult', 'ceil_mode',
                          'final_bn_relu'}


# ---------------------------------------------------------------- converters


def _upstream_keys():
  keys = set()
  for block, n in (('down1', 2), ('down2', 2), ('down3', 3), ('down4', 3),
                   ('down5', 3), ('up5', 3), ('up4', 3), ('up3', 3),
                   ('up2', 2), ('up1', 2)):
    for i in range(1, n + 1):
      p = f'{block}.conv{i}.cbr_unit'
      keys |= {f'{p}.0.weight', f'{p}.0.bias'}
      keys |= {f'{p}.1.{s}' for s in ('weight', 'bias', 'running_mean',
                                       'running_var', 'num_batches_tracked')}
  return keys


def _assert_trees_equal(a, b):
  fa, fb = (traverse_util.flatten_dict(dict(t)) for t in (a, b))
  assert set(fa) == set(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]),
                                  err_msg=str(k))


def test_round_trip_and_upstream_names():
  model = get_model('segnet', 4, final_bn_relu=True, ceil_mode=False, **TINY)
  v = _random_variables(model, (32, 32))
  sd = convert.to_ptsemseg(v, 'segnet')
  # len(segnet(n_classes=K).state_dict()) upstream: 26 conv+BN layers x 7.
  assert set(sd) == _upstream_keys() and len(sd) == 182
  w = sd['up1.conv2.cbr_unit.0.weight']
  assert w.shape == (4, 4, 3, 3)  # torch [O, I, kh, kw]
  np.testing.assert_array_equal(
      w, np.asarray(v['params']['up1']['conv2']['conv']['kernel']).transpose(
          3, 2, 0, 1))
  module, back = convert.from_ptsemseg(sd, 'segnet', **TINY)
  assert module.num_classes == 4
  assert module.final_bn_relu and not module.ceil_mode
  _assert_trees_equal(back, v)


def test_converter_rejects_default_layout_mismatch():
  model = get_model('segnet', 4, final_bn_relu=True, ceil_mode=False, **TINY)
  sd = convert.to_ptsemseg(_random_variables(model, (32, 32)), 'segnet')
  # Upstream weights have a final BatchNorm; the default network has none.
  with pytest.raises(ValueError, match=r"unexpected key 'up1.conv2.cbr_unit.1"):
    convert.from_ptsemseg(sd, 'segnet', final_bn_relu=False, **TINY)
  module, _ = convert.from_ptsemseg(sd, 'segnet', ceil_mode=True, **TINY)
  assert module.ceil_mode


def _torchvision_vgg16_sd(params, r):
  """A torchvision-layout VGG16 state dict with ``params``' encoder widths."""
  sd = {}
  convs = [(b, i) for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
           for i in range(1, n + 1)]
  for idx, (b, i) in zip((0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
                         convs, strict=True):
    kh, kw, cin, cout = params[f'down{b}'][f'conv{i}']['conv']['kernel'].shape
    sd[f'features.{idx}.weight'] = r.standard_normal((cout, cin, kh, kw))
    sd[f'features.{idx}.bias'] = r.standard_normal(cout)
  for idx, shape in ((0, (8, 32 * 49)), (3, (8, 8)), (6, (10, 8))):
    sd[f'classifier.{idx}.weight'] = r.standard_normal(shape)
    sd[f'classifier.{idx}.bias'] = r.standard_normal(shape[0])
  return {k: v.astype(np.float32) for k, v in sd.items()}


def test_init_from_vgg16():
  r = np.random.default_rng(2)
  params = _random_variables(get_model('segnet', 3, **TINY), (32, 32))['params']
  sd = _torchvision_vgg16_sd(params, r)
  new = segnet_convert.init_from_vgg16(params, sd)
  # features.12 is VGG's conv3_2 = down3/conv2.
  np.testing.assert_array_equal(new['down3']['conv2']['conv']['kernel'],
                                sd['features.12.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(new['down5']['conv3']['conv']['bias'],
                                sd['features.28.bias'])
  np.testing.assert_array_equal(new['down1']['conv1']['conv']['kernel'][1, 2],
                                sd['features.0.weight'][:, :, 1, 2].T)
  # BatchNorm and the decoder keep their values, as upstream.
  _assert_trees_equal(new['down3']['conv2']['bn'],
                      params['down3']['conv2']['bn'])
  _assert_trees_equal(new['up5'], params['up5'])
  flat_new = traverse_util.flatten_dict(new)
  flat_old = traverse_util.flatten_dict(params)
  changed = {k for k in flat_old
             if not np.array_equal(flat_new[k], flat_old[k])}
  assert len(changed) == 26  # 13 kernels + 13 biases


def test_init_from_vgg16_errors():
  r = np.random.default_rng(3)
  params = _random_variables(get_model('segnet', 3, **TINY), (32, 32))['params']
  sd = _torchvision_vgg16_sd(params, r)
  bad = dict(sd)
  del bad['features.19.weight']
  with pytest.raises(ValueError, match="missing key 'features.19.weight'"):
    segnet_convert.init_from_vgg16(params, bad)
  with pytest.raises(ValueError, match="unexpected key 'features.1.weight'"):
    segnet_convert.init_from_vgg16(
        params, dict(sd, **{'features.1.weight': np.zeros(1, np.float32)}))
  full = _random_variables(get_model('segnet', 3), (32, 32))['params']
  with pytest.raises(ValueError, match=r"'features.0.weight' has shape "
                     r'\(4, 3, 3, 3\), expected \(64, 3, 3, 3\)'):
    segnet_convert.init_from_vgg16(full, sd)


# ------------------------------------------------- parity with pytorch-semseg


def _oracle():
  src, py = os.environ.get('PTSEMSEG_SRC'), os.environ.get('PTSEMSEG_PYTHON')
  if not src or not py:
    pytest.skip('set PTSEMSEG_SRC (pytorch-semseg work tree) and '
                'PTSEMSEG_PYTHON (a python with torch) for the parity test')
  script = os.environ.get('PTSEMSEG_ORACLE') or str(
      pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'tools' /
      'ptsemseg_oracle.py')
  if not os.path.exists(script):
    pytest.skip(f'oracle script {script} not found (set PTSEMSEG_ORACLE)')
  return src, py, script


@pytest.mark.parametrize('h,w', [(32, 32), (45, 61)])
def test_parity_with_pytorch_semseg(h, w, tmp_path):
  src, py, script = _oracle()
  out = tmp_path / 'segnet.npz'
  subprocess.run([py, script, 'dump', 'segnet', str(h), str(w), str(out)],
                 check=True, capture_output=True,
                 env=dict(os.environ, PTSEMSEG_SRC=src))
  with np.load(out) as d:
    sd = {k[3:]: d[k] for k in d.files if k.startswith('sd/')}
    x, ref = d['x'].transpose(0, 2, 3, 1), d['y'].transpose(0, 2, 3, 1)
  out.unlink()  # ~120 MB
  module, variables = convert.from_ptsemseg(sd, 'segnet')
  y = jax.jit(lambda v, x: module.apply(v, x, train=False).logits)(
      variables, x)
  assert y.shape == ref.shape
  # Measured: 3.4e-7 of the logit scale at both sizes.
  np.testing.assert_allclose(np.asarray(y), ref,
                             atol=1e-4 * np.abs(ref).max(), rtol=0)
