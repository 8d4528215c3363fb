"""Tests of semseg_jax.convert (pytorch-semseg / torchvision weight import).

The parity test against pytorch-semseg itself runs when PTSEMSEG_SRC names
a pytorch-semseg work tree and PTSEMSEG_PYTHON a python with torch; the
oracle script is shared/tools/ptsemseg_oracle.py beside the repository (or
PTSEMSEG_ORACLE).
"""

from flax import traverse_util
import numpy as np
import pytest

from semseg_jax import convert
from semseg_jax.models import get_model
from testing_utils import assert_matches_oracle
from testing_utils import noise_variables
from testing_utils import oracle_dump

TINY_FCN = {'width_mult': 1 / 32}
TINY_UNET = {'feature_scale': 16}


def _upstream_fcn_keys(arch):
  convs = [f'conv_block{b}.{i}'
           for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
           for i in range(0, 2 * n, 2)]
  convs += ['classifier.0', 'classifier.3', 'classifier.6']
  convs += {'fcn32s': [], 'fcn16s': ['score_pool4'],
            'fcn8s': ['score_pool4', 'score_pool3']}[arch]
  keys = {f'{c}.{s}' for c in convs for s in ('weight', 'bias')}
  if arch == 'fcn8s':
    keys |= {'upscore2.weight', 'upscore4.weight', 'upscore8.weight'}
  return keys


def _upstream_unet_keys():
  keys = set()
  for blk in ('conv1', 'conv2', 'conv3', 'conv4', 'center'):
    for c in ('conv1', 'conv2'):
      keys |= {f'{blk}.{c}.0.weight', f'{blk}.{c}.0.bias'}
      keys |= {f'{blk}.{c}.1.{s}' for s in ('weight', 'bias', 'running_mean',
                                             'running_var',
                                             'num_batches_tracked')}
  for i in range(1, 5):
    keys |= {f'up_concat{i}.up.weight', f'up_concat{i}.up.bias'}
    keys |= {f'up_concat{i}.conv.{c}.0.{s}' for c in ('conv1', 'conv2')
             for s in ('weight', 'bias')}
  return keys | {'final.weight', 'final.bias'}


def _assert_trees_equal(a, b):
  fa, fb = traverse_util.flatten_dict(dict(a)), traverse_util.flatten_dict(
      dict(b))
  assert set(fa) == set(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]),
                                  err_msg=str(k))


# ------------------------------------------------------- names and round trip


@pytest.mark.parametrize('arch,n_keys', [('fcn32s', 32), ('fcn16s', 34),
                                         ('fcn8s', 39)])
def test_fcn_round_trip_and_upstream_names(arch, n_keys):
  # n_keys: len(state_dict) of upstream's module at its defaults.
  model = get_model(arch, 5, **TINY_FCN)
  v = noise_variables(model, (32, 32))
  sd = convert.to_ptsemseg(v, arch)
  assert set(sd) == _upstream_fcn_keys(arch) and len(sd) == n_keys
  module, back = convert.from_ptsemseg(sd, arch, **TINY_FCN)
  assert module.num_classes == 5 and module.upsample == model.upsample
  _assert_trees_equal(back, v)


def test_unet_round_trip_and_upstream_names():
  model = get_model('unet', 4, padding='valid', **TINY_UNET)
  v = noise_variables(model, (188, 188))
  sd = convert.to_ptsemseg(v, 'unet')
  assert set(sd) == _upstream_unet_keys()
  assert len(sd) == 86 + 10  # upstream's 86 tensors + 10 BN step counters
  module, back = convert.from_ptsemseg(sd, 'unet', **TINY_UNET)
  assert module.padding == 'valid' and module.num_classes == 4
  assert set(back) == {'params', 'batch_stats'}
  _assert_trees_equal(back, v)


def test_tensor_layouts():
  r = np.random.default_rng(1)
  model = get_model('fcn8s', 3, **TINY_FCN)
  sd = convert.to_ptsemseg(noise_variables(model, (32, 32)), 'fcn8s')
  sd = {k: r.standard_normal(v.shape).astype(np.float32) for k, v in sd.items()}
  _, v = convert.from_ptsemseg(sd, 'fcn8s', **TINY_FCN)
  p = v['params']
  w = sd['conv_block1.0.weight']  # Conv2d [O, I, kh, kw]
  k = np.asarray(p['backbone']['conv1_1']['kernel'])  # [kh, kw, I, O]
  assert k[2, 0, 1, 0] == w[0, 1, 2, 0]
  np.testing.assert_array_equal(k, w.transpose(2, 3, 1, 0))
  w = sd['upscore8.weight']  # ConvTranspose2d [I, O, kh, kw]
  k = np.asarray(p['upscore8']['kernel'])
  assert k[5, 3, 2, 1] == w[2, 1, 5, 3]
  np.testing.assert_array_equal(k, w.transpose(2, 3, 0, 1))
  np.testing.assert_array_equal(p['fc6']['bias'], sd['classifier.0.bias'])
  model = get_model('unet', 2, padding='valid', **TINY_UNET)
  sd = convert.to_ptsemseg(noise_variables(model, (188, 188)), 'unet')
  sd['conv2.conv1.1.running_var'] = r.random(8).astype(np.float32)
  sd['conv2.conv1.1.weight'] = r.random(8).astype(np.float32)
  _, v = convert.from_ptsemseg(sd, 'unet', **TINY_UNET)
  np.testing.assert_array_equal(v['batch_stats']['conv2']['conv1']['bn']['var'],
                                sd['conv2.conv1.1.running_var'])
  np.testing.assert_array_equal(v['params']['conv2']['conv1']['bn']['scale'],
                                sd['conv2.conv1.1.weight'])


def test_accepts_module_prefix_tensor_objects_and_no_step_counter():

  class FakeTensor:  # torch.Tensor-like: detach().cpu().numpy()
    def __init__(self, a):
      self.a = a

    def detach(self):
      return self

    def cpu(self):
      return self

    def numpy(self):
      return self.a

  model = get_model('unet', 2, padding='valid', **TINY_UNET)
  v = noise_variables(model, (188, 188))
  sd = {'module.' + k: FakeTensor(a) for k, a in
        convert.to_ptsemseg(v, 'unet').items()
        if not k.endswith('num_batches_tracked')}
  _, back = convert.from_ptsemseg(sd, 'unet', **TINY_UNET)
  _assert_trees_equal(back, v)


def test_model_kwargs_override_parity_defaults():
  model = get_model('unet', 2, padding='valid', **TINY_UNET)
  sd = convert.to_ptsemseg(noise_variables(model, (188, 188)), 'unet')
  module, _ = convert.from_ptsemseg(sd, 'unet', padding='tile', **TINY_UNET)
  assert module.padding == 'tile'
  module, _ = convert.from_ptsemseg(sd, 'unet', num_classes=2, **TINY_UNET)
  assert module.num_classes == 2


# -------------------------------------------------------------------- errors


@pytest.fixture(scope='module')
def fcn8s_sd():
  model = get_model('fcn8s', 3, **TINY_FCN)
  return convert.to_ptsemseg(noise_variables(model, (32, 32)), 'fcn8s')


def test_missing_key(fcn8s_sd):
  sd = dict(fcn8s_sd)
  del sd['score_pool3.bias']
  with pytest.raises(ValueError,
                     match=r"fcn8s: missing key 'score_pool3.bias'"):
    convert.from_ptsemseg(sd, 'fcn8s', **TINY_FCN)


def test_unexpected_key(fcn8s_sd):
  sd = dict(fcn8s_sd, **{'upscore8.bias': np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match=r"unexpected key 'upscore8.bias'"):
    convert.from_ptsemseg(sd, 'fcn8s', **TINY_FCN)
  # fcn8s weights into a nearest-upsampling fcn8s: upscore* are unexpected.
  with pytest.raises(ValueError, match=r"unexpected key 'upscore2.weight' .*"
                     r'\(and 2 more\)'):
    convert.from_ptsemseg(fcn8s_sd, 'fcn8s', upsample='nearest', **TINY_FCN)


def test_shape_mismatch(fcn8s_sd):
  sd = dict(fcn8s_sd)
  sd['conv_block2.2.weight'] = np.zeros((4, 4, 1, 1), np.float32)
  with pytest.raises(ValueError, match=r"fcn8s: key 'conv_block2.2.weight' has "
                     r'shape \(4, 4, 1, 1\), expected \(4, 4, 3, 3\)'):
    convert.from_ptsemseg(sd, 'fcn8s', **TINY_FCN)
  # Full-width weights into a tiny model: the expected torch shape is named.
  sd = dict(fcn8s_sd)
  sd['conv_block1.0.weight'] = np.zeros((64, 3, 3, 3), np.float32)
  with pytest.raises(ValueError, match=r"'conv_block1.0.weight' has shape "
                     r'\(64, 3, 3, 3\), expected \(2, 3, 3, 3\)'):
    convert.from_ptsemseg(sd, 'fcn8s', **TINY_FCN)


def test_unknown_arch_and_duplicate_prefix(fcn8s_sd):
  with pytest.raises(ValueError, match="no converter for arch 'deeplab'"):
    convert.from_ptsemseg(fcn8s_sd, 'deeplab')
  sd = dict(fcn8s_sd, **{'module.classifier.6.bias': fcn8s_sd[
      'classifier.6.bias']})
  with pytest.raises(ValueError, match="'classifier.6.bias' appears with and "
                     'without'):
    convert.from_ptsemseg(sd, 'fcn8s', **TINY_FCN)


def test_register_arch_validates_kinds():
  with pytest.raises(ValueError, match="unknown kind 'dense'"):
    convert.register_arch('x_test', convert.ArchSpec(
        model='fcn8s', rules=(convert.Rule('a', ('a',), 'dense'),),
        defaults={}, num_classes_key='a.bias', sample_hw=(32, 32)))
  with pytest.raises(ValueError, match='registered twice'):
    convert.register_arch('unet', convert.ARCHS['unet'])


# -------------------------------------------------------- torchvision VGG16


def _torchvision_vgg16_sd(fcn_params, r):
  """A torchvision-layout VGG16 state dict matching a (tiny) FCN's widths."""
  convs = [k for k in sorted(fcn_params['backbone'],
                             key=lambda n: (int(n[4]), int(n[6])))]
  idx = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
  sd = {}
  for i, name in zip(idx, convs, strict=True):
    kh, kw, cin, cout = fcn_params['backbone'][name]['kernel'].shape
    sd[f'features.{i}.weight'] = r.standard_normal((cout, cin, kh, kw))
    sd[f'features.{i}.bias'] = r.standard_normal(cout)
  _, _, c5, f = fcn_params['fc6']['kernel'].shape
  sd['classifier.0.weight'] = r.standard_normal((f, c5 * 49))  # Linear
  sd['classifier.0.bias'] = r.standard_normal(f)
  sd['classifier.3.weight'] = r.standard_normal((f, f))
  sd['classifier.3.bias'] = r.standard_normal(f)
  sd['classifier.6.weight'] = r.standard_normal((10, f))  # "1000" classes
  sd['classifier.6.bias'] = r.standard_normal(10)
  return {k: v.astype(np.float32) for k, v in sd.items()}


def test_vgg16_import():
  r = np.random.default_rng(2)
  params = noise_variables(get_model('fcn16s', 3, **TINY_FCN),
                             (32, 32))['params']
  sd = _torchvision_vgg16_sd(params, r)
  new = convert.vgg16(sd, params)
  np.testing.assert_array_equal(new['backbone']['conv3_2']['kernel'],
                                sd['features.12.weight'].transpose(2, 3, 1, 0))
  # fc6: Linear over torch's flattened (C, 7, 7) -> 7x7 conv kernel.
  w = sd['classifier.0.weight']
  k = np.asarray(new['fc6']['kernel'])
  c5 = k.shape[2]
  assert k[3, 5, 1, 2] == w[2, 1 * 49 + 3 * 7 + 5]
  np.testing.assert_array_equal(new['fc7']['kernel'][0, 0],
                                sd['classifier.3.weight'].T)
  # Heads untouched; fc8 dropped unless copy_fc8.
  _assert_trees_equal(new['score_fr'], params['score_fr'])
  _assert_trees_equal(new['score_pool4'], params['score_pool4'])
  new = convert.vgg16(sd, params, copy_fc8=True)
  np.testing.assert_array_equal(new['score_fr']['kernel'][0, 0],
                                sd['classifier.6.weight'][:3].T)
  np.testing.assert_array_equal(new['score_fr']['bias'],
                                sd['classifier.6.bias'][:3])
  assert c5 == 16


def test_vgg16_errors():
  r = np.random.default_rng(3)
  params = noise_variables(get_model('fcn8s', 3, **TINY_FCN),
                             (32, 32))['params']
  sd = _torchvision_vgg16_sd(params, r)
  with pytest.raises(ValueError, match="unexpected key 'features.1.weight'"):
    convert.vgg16(dict(sd, **{'features.1.weight': np.zeros(1)}), params)
  bad = dict(sd)
  del bad['features.28.bias']
  with pytest.raises(ValueError, match="missing key 'features.28.bias'"):
    convert.vgg16(bad, params)
  # Without params the targets are full VGG16 widths.
  with pytest.raises(ValueError, match=r"'features.0.weight' has shape "
                     r'\(2, 3, 3, 3\), expected \(64, 3, 3, 3\)'):
    convert.vgg16(sd)
  with pytest.raises(ValueError, match='copy_fc8'):
    convert.vgg16(sd, copy_fc8=True)


# ------------------------------------------------- parity with pytorch-semseg


@pytest.mark.parametrize('arch,h,w', [('fcn32s', 45, 61), ('fcn16s', 17, 100),
                                      ('fcn8s', 45, 61), ('fcn8s', 1, 1),
                                      ('unet', 188, 204), ('unet', 252, 188)])
def test_parity_with_pytorch_semseg(arch, h, w, tmp_path):
  sd, x, ref = oracle_dump(arch, h, w, tmp_path)
  module, variables = convert.from_ptsemseg(sd, arch)
  del sd
  assert_matches_oracle(module, variables, x, ref)
