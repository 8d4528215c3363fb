"""Tests of the torchvision-layout ResNet backbone and its torchvision weight
converter (tiny widths; eval_shape for full-size networks).

The parity test against a torch re-implementation of torchvision's ResNet
(torchvision itself is not needed) runs when PTSEMSEG_PYTHON names a python
with torch; the script is shared/tools/torch_resnet_linknet_oracle.py beside
the repository (or TORCH_RESNET_ORACLE).
"""
import functools
import math
import os
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semseg_jax.convert import resnet as convert_resnet
from semseg_jax.models.backbones import resnet as resnet_lib
from semseg_jax.models.backbones.resnet import ResNet
from testing_utils import param_count

TINY = 1 / 16  # 64 -> 4 channels


def _shapes(model, hw):
  x = jax.ShapeDtypeStruct((2, *hw, 3), jnp.float32)
  return jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False), x)


@pytest.mark.parametrize('depth,torchvision_count,fc', [
    # torchvision's resnetN() parameter counts, minus its fc classifier.
    (18, 11_689_512, 512 * 1000 + 1000),
    (34, 21_797_672, 512 * 1000 + 1000),
    (50, 25_557_032, 2048 * 1000 + 1000),
    (101, 44_549_160, 2048 * 1000 + 1000),
    (152, 60_192_808, 2048 * 1000 + 1000),
])
def test_parameter_counts_equal_torchvision_without_fc(depth, torchvision_count,
                                                       fc):
  _, v = _shapes(ResNet(depth), (64, 64))
  assert param_count(v['params']) == torchvision_count - fc
  # BatchNorm statistics: mean and var per BN channel.
  n_bn = sum(math.prod(x.shape) for x in jax.tree.leaves(v['batch_stats']))
  scales = [x for k, x in jax.tree_util.tree_leaves_with_path(v['params'])
            if k[-1].key == 'scale']
  assert n_bn == 2 * param_count(scales)


@pytest.mark.parametrize('depth,output_stride,hw', [
    (18, 32, (64, 64)), (18, 16, (37, 53)), (18, 8, (37, 53)), (18, 8, (1, 1)),
    (50, 32, (1, 1)), (50, 8, (37, 53))])
def test_feature_shapes_strides_and_channels(depth, output_stride, hw):
  feats, v = _shapes(ResNet(depth, output_stride, TINY), hw)
  channels = resnet_lib.feature_channels(depth, TINY)
  strides = resnet_lib.feature_strides(output_stride)
  # Dilation adds no parameters.
  _, v32 = _shapes(ResNet(depth, 32, TINY), hw)
  assert jax.tree.map(lambda s: s.shape, v) == jax.tree.map(lambda s: s.shape,
                                                            v32)
  assert set(feats) == set(resnet_lib.STAGES)
  for name, f in feats.items():
    size = hw
    for _ in range(int(math.log2(strides[name]))):
      size = tuple(math.ceil(n / 2) for n in size)  # torch's stride-2 sizes
    assert f.shape == (2, *size, channels[name]), name
    assert f.dtype == jnp.float32


def test_feature_channels_and_strides_tables():
  assert resnet_lib.feature_channels(50) == {
      'conv1': 64, 'stem': 64, 'layer1': 256, 'layer2': 512, 'layer3': 1024,
      'layer4': 2048}
  assert resnet_lib.feature_channels(34, 0.5)['layer4'] == 256
  assert resnet_lib.feature_strides(16) == {
      'conv1': 2, 'stem': 4, 'layer1': 4, 'layer2': 8, 'layer3': 16,
      'layer4': 16}
  assert resnet_lib.feature_strides(8)['layer3'] == 8


def test_bad_options_raise_clear_errors():
  x = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match=r'depth must be one of \[18, 34, 50, '
                     r'101, 152\], got 26'):
    ResNet(26).init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match='output_stride must be one of '
                     r'\(8, 16, 32\), got 4'):
    ResNet(18, output_stride=4).init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match=r'multi_grid needs 3 values .*got '
                     r'\(1, 2\)'):
    ResNet(50, 16, multi_grid=(1, 2)).init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match=r'NHWC.*\(32, 32, 3\)'):
    ResNet(18).init(jax.random.key(0), x[0], train=False)
  with pytest.raises(ValueError, match='depth'):
    resnet_lib.feature_channels(20)


@functools.lru_cache(maxsize=None)
def _tiny_variables(depth):
  """Random params AND random BatchNorm statistics of a tiny ResNet."""
  model = ResNet(depth, width_mult=TINY)
  v = jax.jit(lambda x: model.init(jax.random.key(0, impl='rbg'), x,
                                   train=False))(jnp.zeros((1, 32, 32, 3)))
  leaves, tree = jax.tree.flatten(v)
  r = np.random.default_rng(depth)
  leaves = [jnp.asarray(r.uniform(0.5, 1.5, x.shape) if x.ndim == 1 else x,
                        jnp.float32) for x in leaves]
  return jax.tree.unflatten(tree, leaves)


@pytest.mark.parametrize('depth', [18, 50])
def test_dilation_is_exact_atrous(depth):
  # Replacing a stride by dilation (and dilating every later 3x3 conv) only
  # makes the map denser: subsampling it by the removed stride gives the
  # plain network's map exactly. A wrong rate or padding breaks this.
  v = _tiny_variables(depth)
  x = jax.random.normal(jax.random.key(1), (1, 45, 59, 3))

  @jax.jit
  def run(v, x):
    return [ResNet(depth, s, TINY).apply(v, x, train=False) for s in (32, 8)]

  f32, f8 = run(v, x)

  def close(a, b):  # float32 rounding of sums in a different order
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * np.abs(b).max())

  close(f8['layer3'][:, ::2, ::2], f32['layer3'])
  close(f8['layer4'][:, ::4, ::4], f32['layer4'])
  np.testing.assert_array_equal(f8['layer2'], f32['layer2'])
  assert f8['layer4'].shape[1:3] == (6, 8) and f32['layer4'].shape[1:3] == (2, 2)


def test_multi_grid_changes_layer4_only():
  v = _tiny_variables(50)
  x = jax.random.normal(jax.random.key(2), (1, 64, 64, 3))
  base, mg = jax.jit(lambda v, x: [
      ResNet(50, 16, TINY, multi_grid=g).apply(v, x, train=False)
      for g in (None, (1, 2, 4))])(v, x)
  np.testing.assert_array_equal(mg['layer3'], base['layer3'])
  assert mg['layer4'].shape == base['layer4'].shape
  assert np.abs(np.asarray(mg['layer4'] - base['layer4'])).max() > 1e-3


def test_train_mode_updates_batch_stats_and_bfloat16():
  v = _tiny_variables(18)
  x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))

  @jax.jit
  def run(v, x):
    model = ResNet(18, width_mult=TINY)
    train = model.apply(v, x, train=True, mutable=['batch_stats'])
    f16 = ResNet(18, width_mult=TINY, dtype=jnp.bfloat16).apply(v, x,
                                                                train=False)
    return train, f16, model.apply(v, x, train=False)

  (feats, updates), f16, f32 = run(v, x)
  old = v['batch_stats']['layer1_0']['bn1']['mean']
  new = updates['batch_stats']['layer1_0']['bn1']['mean']
  assert not np.allclose(old, new)
  assert feats['layer4'].shape == (2, 1, 1, 32)
  assert f16['layer4'].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(f16['layer4'], np.float32),
                             f32['layer4'], atol=0.1 * np.abs(
                                 f32['layer4']).max())


def test_conv_init_is_kaiming_fan_out():
  model = ResNet(18, width_mult=0.5)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                         train=False))
  # Initialise one big kernel through the same initializer.
  k = shapes['params']['layer4_1']['conv2']['kernel']
  assert k.shape == (3, 3, 256, 256)
  w = resnet_lib._conv_init(jax.random.key(0), k.shape)
  assert abs(float(jnp.std(w)) / math.sqrt(2 / (9 * 256)) - 1) < 0.01
  assert float(jnp.max(jnp.abs(w))) > 4.5 * math.sqrt(2 / (9 * 256))  # untruncated


# ----------------------------------------------------------- converter


@pytest.mark.parametrize('depth,n_keys', [(18, 122), (50, 320)])
def test_torchvision_round_trip_and_names(depth, n_keys):
  v = _tiny_variables(depth)
  sd = convert_resnet.to_torchvision_resnet(v)
  # torchvision's state dict has n_keys entries including fc.weight/bias.
  assert len(sd) == n_keys - 2
  assert 'layer1.0.conv1.weight' in sd and 'bn1.running_var' in sd
  assert 'layer2.0.downsample.0.weight' in sd
  assert 'layer1.0.downsample.0.weight' not in sd or depth == 50
  assert sd['conv1.weight'].shape == (4, 3, 7, 7)  # OIHW
  sd['fc.weight'] = np.zeros((1000, 32 * (4 if depth == 50 else 1)))
  sd['fc.bias'] = np.zeros(1000)
  back = convert_resnet.torchvision_resnet(sd, width_mult=TINY)
  jax.tree.map(np.testing.assert_array_equal, back, v)
  assert convert_resnet.infer_depth(sd) == depth


def test_synthetic_full_size_resnet18_state_dict():
  # A state dict with torchvision's full ResNet-18 shapes, built from ours.
  shapes = jax.eval_shape(lambda: ResNet(18).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  r = np.random.default_rng(0)
  v = jax.tree.map(lambda s: r.standard_normal(s.shape).astype(np.float32),
                   shapes)
  sd = convert_resnet.to_torchvision_resnet(v, 18)
  sd.update({'fc.weight': np.zeros((1000, 512), np.float32),
             'fc.bias': np.zeros(1000, np.float32)})
  sd = {f'module.{k}': x for k, x in sd.items()}  # DataParallel prefix
  back = convert_resnet.torchvision_resnet(sd)
  assert param_count(back['params']) == 11_689_512 - 513_000
  np.testing.assert_array_equal(back['params']['layer3_0']['conv1']['kernel'],
                                v['params']['layer3_0']['conv1']['kernel'])


def test_converter_errors_name_the_key():
  v = _tiny_variables(18)
  sd = convert_resnet.to_torchvision_resnet(v)
  bad = dict(sd)
  del bad['layer3.1.bn2.running_mean']
  with pytest.raises(ValueError, match="missing key 'layer3.1.bn2.running_mean'"):
    convert_resnet.torchvision_resnet(bad, 18, width_mult=TINY)
  bad = dict(sd, **{'layer1.0.conv1.bias': np.zeros(4)})
  with pytest.raises(ValueError, match="unexpected key 'layer1.0.conv1.bias'"):
    convert_resnet.torchvision_resnet(bad, 18, width_mult=TINY)
  with pytest.raises(ValueError, match=r"'conv1.weight' has shape \(4, 3, 7, 7\),"
                     r' expected \(64, 3, 7, 7\)'):
    convert_resnet.torchvision_resnet(sd, 18)  # wrong width
  with pytest.raises(ValueError, match=r'BasicBlock blocks per stage \(2, 2, 1, 2\)'):
    convert_resnet.infer_depth({k: x for k, x in sd.items()
                                if not k.startswith('layer3.1.')})
  with pytest.raises(ValueError, match=r"resnet50: key 'layer1.0.conv1.weight' "
                     r'has shape \(4, 4, 3, 3\), expected \(4, 4, 1, 1\)'):
    convert_resnet.torchvision_resnet(sd, 50, width_mult=TINY)  # wrong depth


# ----------------------------------------- parity with torch (torchvision)


def _oracle():
  py = os.environ.get('PTSEMSEG_PYTHON')
  if not py:
    pytest.skip('set PTSEMSEG_PYTHON (a python with torch) for the parity test')
  script = os.environ.get('TORCH_RESNET_ORACLE') or str(
      pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'tools' /
      'torch_resnet_linknet_oracle.py')
  if not os.path.exists(script):
    pytest.skip(f'oracle script {script} not found (set TORCH_RESNET_ORACLE)')
  if subprocess.run([py, '-c', 'import torch'], capture_output=True).returncode:
    pytest.skip(f'torch is not importable in PTSEMSEG_PYTHON={py}')
  return py, script


@pytest.mark.parametrize('depth,output_stride,hw,multi_grid', [
    (18, 32, (64, 64), None), (18, 8, (37, 45), None),
    (50, 16, (33, 64), None), (50, 16, (64, 64), (1, 2, 4)),
    (101, 8, (32, 40), None)])
def test_parity_with_torch_resnet(depth, output_stride, hw, multi_grid,
                                  tmp_path):
  py, script = _oracle()
  out = tmp_path / 'resnet.npz'
  args = [py, script, 'resnet', str(depth), str(output_stride), *map(str, hw),
          str(TINY), str(out)]
  if multi_grid:
    args.append(','.join(map(str, multi_grid)))
  subprocess.run(args, check=True, capture_output=True)
  with np.load(out) as d:
    sd = {k[3:]: d[k] for k in d.files if k.startswith('sd/')}
    x = d['x'].transpose(0, 2, 3, 1)
    refs = {k[2:]: d[k].transpose(0, 2, 3, 1) for k in d.files
            if k.startswith('y/')}
  v = convert_resnet.torchvision_resnet(sd, width_mult=TINY)
  feats = jax.jit(lambda v, x: ResNet(depth, output_stride, TINY, multi_grid=
                                      multi_grid).apply(v, x, train=False))(v, x)
  assert set(refs) == set(resnet_lib.STAGES)
  for name, ref in refs.items():
    assert feats[name].shape == ref.shape, name
    np.testing.assert_allclose(np.asarray(feats[name]), ref,
                               atol=1e-4 * np.abs(ref).max(), rtol=0,
                               err_msg=name)
