"""Tests of LinkNet, its config and loading torchvision ResNet-18 weights into
its encoder (tiny widths; eval_shape for the full-size network).

The parity test against a torch re-implementation of the authors' PyTorch
LinkNet runs when PTSEMSEG_PYTHON names a python with torch (script:
shared/tools/torch_resnet_linknet_oracle.py beside the repository, or
TORCH_RESNET_ORACLE).
"""
import functools
import importlib.util
import os
import pathlib
import re
import subprocess

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testing_utils

from semseg_jax import config as config_lib
from semseg_jax import train
from semseg_jax.convert import resnet as convert_resnet
from semseg_jax.convert.ptsemseg import fill
from semseg_jax.convert.ptsemseg import Rule
from semseg_jax.models import get_model
from semseg_jax.models.backbones.resnet import ResNet
from testing_utils import abstract_apply
from testing_utils import param_count

TINY = 1 / 8  # encoder 8..64 channels, final block 4


def _shapes(model, hw):
  return abstract_apply(model, hw)


def _decoder_count(m, n):
  q = m // 4
  return m * q + 9 * q * q + q * n + 2 * (q + q + n)  # 3 convs + 3 BNs


def test_parameter_count_matches_the_paper():
  k = 19
  v, out = _shapes(get_model('linknet', k), (64, 64))
  encoder = 11_689_512 - 513_000  # torchvision resnet18 without fc
  decoders = sum(_decoder_count(m, n) for m, n in
                 ((512, 256), (256, 128), (128, 64), (64, 64)))
  final = (9 * 64 * 32 + 32 + 64) + (9 * 32 * 32 + 32 + 64) + (4 * 32 * k + k)
  assert param_count(v['params']['encoder']) == encoder
  assert param_count(v['params']) == encoder + decoders + final == 11_535_699
  assert abs(param_count(v['params']) / 11.5e6 - 1) < 0.01  # paper: 11.5M
  assert out.logits.shape == (1, 64, 64, k)


def test_flops_at_the_papers_input_size():
  # Paper: 21.2 GFLOPs at 3x640x360; XLA counts 18.9 G (2 flops per MAC).
  model = get_model('linknet', 19)
  x = jax.ShapeDtypeStruct((1, 360, 640, 3), jnp.float32)
  v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                     x)
  cost = jax.jit(lambda v, x: model.apply(v, x, train=False).logits).lower(
      v, x).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert 17e9 < cost['flops'] < 21.2e9


@pytest.mark.parametrize('hw', [(64, 96), (33, 47), (1, 1), (2, 3), (360, 640),
                                (65, 63)])
def test_logits_at_input_resolution_any_size(hw):
  _, out = _shapes(get_model('linknet', 5, width_mult=TINY), hw)
  assert out.logits.shape == (1, *hw, 5)
  assert out.logits.dtype == jnp.float32
  assert out.aux == ()


@pytest.mark.parametrize('depth,encoder_count', [(34, 21_284_672),
                                                 (50, 23_508_032)])
def test_other_encoder_depths(depth, encoder_count):
  v, out = _shapes(get_model('linknet', 3, encoder_depth=depth), (37, 45))
  assert param_count(v['params']['encoder']) == encoder_count
  assert out.logits.shape == (1, 37, 45, 3)
  if depth == 50:  # decoders take the stage widths: 2048 -> 1024, ...
    assert v['params']['decoder4']['conv1']['conv']['kernel'].shape == (
        1, 1, 2048, 512)
    assert v['params']['decoder1']['conv2']['conv']['kernel'].shape == (
        1, 1, 64, 64)


def test_bad_input_raises():
  with pytest.raises(ValueError, match=r'NHWC.*\(32, 32, 3\)'):
    get_model('linknet', 3).init(jax.random.key(0), jnp.zeros((32, 32, 3)),
                                 train=False)


@functools.lru_cache(maxsize=None)
def _tiny():
  model = get_model('linknet', 4, width_mult=TINY)
  v = jax.jit(lambda x: model.init(jax.random.key(0, impl='rbg'), x,
                                   train=False))(jnp.zeros((1, 32, 32, 3)))
  return model, v


def test_bfloat16_compute_float32_params_and_logits():
  # Numerics of bfloat16 compute are checked on the ResNet (test_resnet.py).
  m16 = get_model('linknet', 4, width_mult=TINY, dtype=jnp.bfloat16)
  v16, out = _shapes(m16, (33, 35))
  assert out.logits.dtype == jnp.float32 and out.logits.shape == (1, 33, 35, 4)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v16))
  # The computation itself runs in bfloat16.
  x = jax.ShapeDtypeStruct((1, 33, 35, 3), jnp.float32)
  hlo = jax.jit(lambda v, x: m16.apply(v, x, train=False).logits).lower(
      v16, x).as_text()
  assert re.search(r'convolution.*bf16', hlo)


def test_tiny_linknet_learns_a_batch():
  config = testing_utils.model_config(
      {'name': 'linknet', 'width_mult': TINY}, **{
          'schedule.name': 'constant', 'optimizer.learning_rate': 1e-2})
  losses = testing_utils.train_losses(config, 10)
  # Measured: 1.91 -> 1.57, falling at every step.
  assert losses[-1] < 0.85 * losses[0], losses
  assert all(b < a for a, b in zip(losses, losses[1:])), losses


# ------------------------------------------ torchvision ResNet-18 encoder


def _torchvision_sd(width_mult, seed=0):
  """A torchvision-named ResNet-18 state dict with our shapes at
  ``width_mult`` (random values) and an ImageNet fc."""
  shapes = jax.eval_shape(lambda: ResNet(18, width_mult=width_mult).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  r = np.random.default_rng(seed)
  v = jax.tree.map(lambda s: r.standard_normal(s.shape).astype(np.float32),
                   shapes)
  sd = convert_resnet.to_torchvision_resnet(v, 18)
  c = sd['layer4.1.bn2.weight'].shape[0]
  sd.update({'fc.weight': np.zeros((1000, c)), 'fc.bias': np.zeros(1000)})
  return v, sd


def test_load_backbone_replaces_only_the_encoder():
  _, v = _tiny()
  resnet_v, sd = _torchvision_sd(TINY)
  new = convert_resnet.load_backbone(v, sd)  # finds ('encoder',) itself
  for col in ('params', 'batch_stats'):
    jax.tree.map(np.testing.assert_array_equal, new[col]['encoder'],
                 resnet_v[col])
    for name in v[col]:
      if name != 'encoder':
        jax.tree.map(np.testing.assert_array_equal, new[col][name],
                     v[col][name])
  same = convert_resnet.load_backbone(v, sd, path=('encoder',))
  jax.tree.map(np.testing.assert_array_equal, same, new)


def test_load_backbone_errors():
  _, v = _tiny()
  _, sd = _torchvision_sd(1.0)
  with pytest.raises(ValueError, match=r"'conv1.weight' has shape "
                     r'\(64, 3, 7, 7\), expected \(8, 3, 7, 7\)'):
    convert_resnet.load_backbone(v, sd)
  _, sd = _torchvision_sd(TINY)
  del sd['layer2.0.downsample.1.running_var']
  with pytest.raises(ValueError,
                     match="missing key 'layer2.0.downsample.1.running_var'"):
    convert_resnet.load_backbone(v, sd)
  with pytest.raises(ValueError, match='0 ResNet backbones'):
    convert_resnet.load_backbone({'params': {'conv': {}}}, sd)
  with pytest.raises(ValueError, match="no module 'decoder'"):
    convert_resnet.load_backbone(v, sd, path=('decoder',))


def test_init_workdir_then_training_state_holds_the_weights(tmp_path):
  config = testing_utils.model_config({'name': 'linknet', 'width_mult': TINY})
  resnet_v, sd = _torchvision_sd(TINY)
  np.savez(tmp_path / 'r18.npz', **sd)
  out = str(tmp_path / 'run')
  convert_resnet.init_workdir(
      config, convert_resnet.read_state_dict(str(tmp_path / 'r18.npz')), out)
  _, variables, step = train.restore_variables(config, out)
  assert step == 0
  np.testing.assert_array_equal(
      variables['params']['encoder']['layer3_1']['conv2']['kernel'],
      resnet_v['params']['layer3_1']['conv2']['kernel'])
  np.testing.assert_array_equal(
      variables['batch_stats']['encoder']['bn1']['var'],
      resnet_v['batch_stats']['bn1']['var'])
  with pytest.raises(ValueError, match='already has checkpoints'):
    convert_resnet.init_workdir(config, sd, out)


# ----------------------------------------------------------------- config


def _load_config(arg):
  path = pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'linknet.py'
  spec = importlib.util.spec_from_file_location('linknet_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize('arg,k,hw', [(None, 19, (512, 1024)),
                                      ('camvid', 11, (576, 768))])
def test_config(arg, k, hw):
  config = _load_config(arg)
  config_lib.validate_config(config)
  assert config.num_classes == k and tuple(config.dataset.image_size) == hw
  model = train.create_model(config)
  defaults = get_model('linknet', k)
  assert {key for key in config.model if key != 'name'} == {
      'encoder_depth', 'width_mult'}
  for key in ('encoder_depth', 'width_mult'):
    assert config.model[key] == getattr(defaults, key)
  _, out = _shapes(model, hw)
  assert out.logits.shape == (1, *hw, k)
  with pytest.raises(ValueError, match="got 'voc'"):
    _load_config('voc')


# ------------------------------------------------- parity with torch


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


def _authors_rules():
  """e-lab/pytorch-linknet's state-dict names -> our LinkNet."""
  rules = []
  for r in convert_resnet.resnet_rules(18, ('encoder',)):
    name = {'conv1': 'in_block.0', 'bn1': 'in_block.1'}.get(
        r.torch, re.sub(r'^layer(\d)\.', r'encoder\1.', r.torch))
    rules.append(Rule(name, r.flax, r.kind))
  for i in range(1, 5):
    d = f'decoder{i}'
    rules += [Rule(f'{d}.conv1.0', (d, 'conv1', 'conv'), 'conv'),
              Rule(f'{d}.conv1.1', (d, 'conv1', 'bn'), 'bn'),
              Rule(f'{d}.tp_conv.0', (d, 'tp_conv'), 'conv_transpose'),
              Rule(f'{d}.tp_conv.1', (d, 'tp_bn'), 'bn'),
              Rule(f'{d}.conv2.0', (d, 'conv2', 'conv'), 'conv'),
              Rule(f'{d}.conv2.1', (d, 'conv2', 'bn'), 'bn')]
  return rules + [Rule('tp_conv1.0', ('tp_conv1',), 'conv_transpose'),
                  Rule('tp_conv1.1', ('tp_bn1',), 'bn'),
                  Rule('conv2.0', ('conv2', 'conv'), 'conv'),
                  Rule('conv2.1', ('conv2', 'bn'), 'bn'),
                  Rule('tp_conv2', ('tp_conv2',), 'conv_transpose')]


@pytest.mark.parametrize('hw', [(64, 96), (37, 45), (33, 50)])
def test_parity_with_the_authors_pytorch_linknet(hw, tmp_path):
  # Even multiples of 32: the authors' network exactly. Odd sizes: theirs
  # with each decoder output cropped to its skip.
  py, script = _oracle()
  out = tmp_path / 'linknet.npz'
  subprocess.run([py, script, 'linknet', *map(str, hw), '5', str(TINY),
                  str(out)], check=True, capture_output=True)
  with np.load(out) as d:
    sd = {k[3:]: d[k] for k in d.files if k.startswith('sd/')}
    x, ref = d['x'].transpose(0, 2, 3, 1), d['y/logits'].transpose(0, 2, 3, 1)
  model = get_model('linknet', 5, width_mult=TINY)
  target = traverse_util.flatten_dict(dict(_shapes(model, hw)[0]))
  flat = fill(sd, _authors_rules(), target, 'linknet')
  v = traverse_util.unflatten_dict({k: jnp.asarray(a) for k, a in flat.items()})
  y = jax.jit(lambda v, x: model.apply(v, x, train=False).logits)(v, x)
  assert y.shape == ref.shape
  np.testing.assert_allclose(np.asarray(y), ref,
                             atol=1e-4 * np.abs(ref).max(), rtol=0)
