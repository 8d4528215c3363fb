"""Tests of ICNet / ICNet-BN and their converter (tiny widths; eval_shape for
the full networks).

The parity test against pytorch-semseg runs when PTSEMSEG_SRC names a
pytorch-semseg work tree and PTSEMSEG_PYTHON a python with torch (oracle:
shared/tools/ptsemseg_oracle.py beside the repository, or PTSEMSEG_ORACLE).
"""
import textwrap

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semseg_jax import convert
from semseg_jax import losses
from semseg_jax.convert import icnet as icnet_convert
from semseg_jax.models import get_model
from testing_utils import abstract_apply
from testing_utils import assert_matches_oracle
from testing_utils import model_config
from testing_utils import noise_variables
from testing_utils import oracle_dump
from testing_utils import param_count
from testing_utils import train_losses

KEY = jax.random.key(0, impl='rbg')  # fast to compile on CPU
# 32 -> 4 channels, 1024 -> 128; one block per stage.
TINY = {'width_mult': 1 / 8, 'block_config': (1, 2, 1, 1)}


def _shapes(model, hw, batch=1, train=False):
  return abstract_apply(model, hw, train=train, batch=batch)


# --------------------------------------------------------------- the network


@pytest.mark.parametrize('name,k,kw,count', [
    # pytorch-semseg icnet(is_batchnorm=False / True); 19 is its default K.
    ('icnet', 19, {}, 7_742_649),
    ('icnetBN', 19, {}, 7_757_945),
    ('icnet', 21, {}, 7_743_679),
    ('icnetBN', 21, {}, 7_758_975),
    # Without upstream's 4 never-applied 1x1 convs 1024 -> 256 (+ bias / BN).
    ('icnet', 19, {'unused_pool_convs': False}, 7_742_649 - 4 * (1024 + 1) * 256),
    ('icnetBN', 19, {'unused_pool_convs': False},
     7_757_945 - 4 * (1024 + 2) * 256),
])
def test_parameter_counts(name, k, kw, count):
  v, out = _shapes(get_model(name, k, **kw), (65, 97))
  assert param_count(v['params']) == count
  assert out.logits.shape == (1, 65, 97, k)
  assert ('batch_stats' in v) == (name == 'icnetBN')


def test_names_and_defaults():
  assert get_model('icnet', 3).is_batchnorm is False
  assert get_model('icnetBN', 3).is_batchnorm is True
  v, _ = _shapes(get_model('icnetBN', 3, **TINY), (33, 33))
  assert set(v['params']['cff_sub24']) == {
      'low_dilated_conv_bn', 'high_proj_conv_bn', 'low_classifier_conv'}
  assert set(v['params']['res_block3_identity']) == {'layers_0'}
  assert set(v['params']['pyramid_pooling']) == {f'path_{i}' for i in range(4)}
  v, _ = _shapes(get_model('icnet', 3, unused_pool_convs=False, **TINY),
                 (33, 33))
  assert 'pyramid_pooling' not in v['params']
  assert set(v['params']['conv5_4_k1']['conv']) == {'kernel', 'bias'}


@pytest.mark.parametrize('hw,aux_hw', [
    # 32k + 1 sizes (upstream's): CFF zooms (n - 1) * 2 + 1 line up exactly.
    ((97, 65), ((13, 9), (7, 5))),
    ((225, 289), ((29, 37), (15, 19))),
    # Any other size.
    ((64, 64), ((8, 8), (4, 4))),
    ((37, 54), ((5, 7), (3, 4))),
    ((1, 1), ((1, 1), (1, 1))),
])
def test_logits_at_input_resolution_and_aux_scales(hw, aux_hw):
  model = get_model('icnetBN', 5, **TINY)
  _, out = _shapes(model, hw, batch=2)
  assert out.logits.shape == (2, *hw, 5) and out.aux == ()
  _, out = _shapes(model, hw, batch=2, train=True)
  assert out.logits.shape == (2, *hw, 5) and out.logits.dtype == jnp.float32
  assert [a.shape for a in out.aux] == [(2, *s, 5) for s in aux_hw]


def test_upstream_pool_mode_size_rule():
  # Upstream's evaluation windows need the 33x65 map of a 1025x2049 input.
  model = get_model('icnet', 3, pool_mode='upstream', **TINY)
  with pytest.raises(ValueError, match=r"'upstream'.*at least 33x65 at 1/32; "
                     r'got 17x33 for a 513x1025 input'):
    _shapes(model, (513, 1025))
  _shapes(model, (1025, 2049))
  # In training it pools like 'floor' and accepts smaller inputs.
  _shapes(model, (225, 289), train=True)
  with pytest.raises(ValueError, match=r"pool_mode='floor'.*at least 6"):
    _shapes(get_model('icnet', 3, pool_mode='floor', **TINY), (129, 129))
  with pytest.raises(ValueError, match=r'bins \(6, 3, 2, 1\) only'):
    _shapes(get_model('icnet', 3, pool_mode='upstream', bins=(4, 2, 1),
                      **TINY), (1025, 2049))
  with pytest.raises(ValueError, match='pool_mode must be one of'):
    _shapes(get_model('icnet', 3, pool_mode='caffe', **TINY), (65, 65))


def test_bfloat16_compute_float32_params_and_logits():
  v, out = _shapes(get_model('icnetBN', 3, dtype=jnp.bfloat16, **TINY),
                   (65, 65), train=True)
  assert {p.dtype for p in jax.tree.leaves(v)} == {jnp.dtype(jnp.float32)}
  assert {a.dtype for a in (out.logits, *out.aux)} == {jnp.dtype(jnp.float32)}


def _np_resize_ac(x, hw):
  """Bilinear, align_corners=True (float64), x [B, H, W, C]."""
  for axis, n_out in ((1, hw[0]), (2, hw[1])):
    n_in = x.shape[axis]
    src = np.arange(n_out) * ((n_in - 1) / (n_out - 1))
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    wt = (src - i0).reshape([-1 if a == axis else 1 for a in range(4)])
    x = np.take(x, i0, axis) * (1 - wt) + np.take(x, i1, axis) * wt
  return x


def _np_ce(logits, labels):
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  return -np.take_along_axis(logp, labels[..., None], -1).mean()


def test_loss_reproduces_upstream_multi_scale_cross_entropy():
  # Upstream trains on (1/4, 1/8, 1/16) logits with weights 0.4 ** i, each
  # upsampled to the labels (align_corners=True). Ours: logits = the 1/4
  # logits upsampled the same way, aux = (1/8, 1/16), aux_weights (0.4, 0.16).
  model = get_model('icnetBN', 4, **TINY)
  x = jax.random.normal(jax.random.key(1), (2, 97, 65, 3))
  labels = jax.random.randint(jax.random.key(2), (2, 97, 65), 0, 4)

  @jax.jit
  def run(x, labels):
    v = model.init(KEY, x, train=False)
    (out, state) = model.apply(
        v, x, train=True, mutable=['batch_stats', 'intermediates'],
        capture_intermediates=lambda m, _: m.name == 'classification')
    loss, _ = losses.segmentation_loss(out, labels, aux_weights=(0.4, 0.16))
    return out, state['intermediates']['classification']['__call__'][0], loss

  out, quarter, loss = run(x, labels)
  assert quarter.shape == (2, 25, 17, 4)  # (97 - 1) / 4 + 1, (65 - 1) / 4 + 1
  np.testing.assert_allclose(np.asarray(out.logits),
                             _np_resize_ac(np.asarray(quarter), (97, 65)),
                             rtol=1e-5, atol=1e-5)
  y = np.asarray(labels)
  ref = sum(0.4 ** i * _np_ce(_np_resize_ac(np.asarray(o, np.float64),
                                            (97, 65)), y)
            for i, o in enumerate((quarter, *out.aux)))
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_unused_pool_convs_never_touch_the_output_and_repeat_pass():
  model = get_model('icnetBN', 3, **TINY)
  repeat = get_model('icnetBN', 3, repeat_res3_identity=True, **TINY)
  x = jax.random.normal(jax.random.key(3), (2, 65, 65, 3))
  v = jax.jit(lambda x: model.init(KEY, x, train=False))(x)

  def train_fwd(m):
    return jax.jit(lambda v, x: m.apply(v, x, train=True,
                                        mutable=['batch_stats']))

  out, upd = train_fwd(model)(v, x)
  # Scrambled pyramid convs: same logits (upstream never applies them).
  params = dict(v['params'])
  params['pyramid_pooling'] = jax.tree.map(lambda a: a + 3.0,
                                           params['pyramid_pooling'])
  out2, _ = train_fwd(model)({**v, 'params': params}, x)
  np.testing.assert_array_equal(np.asarray(out.logits),
                                np.asarray(out2.logits))
  # Upstream's discarded second res_block3_identity pass: same outputs, but
  # that stage's running statistics are updated twice.
  out3, upd3 = train_fwd(repeat)(v, x)
  np.testing.assert_array_equal(np.asarray(out.logits),
                                np.asarray(out3.logits))
  a = traverse_util.flatten_dict(upd['batch_stats'])
  b = traverse_util.flatten_dict(upd3['batch_stats'])
  for k in a:
    same = np.array_equal(np.asarray(a[k]), np.asarray(b[k]))
    assert same == (k[0] != 'res_block3_identity'), k


def test_tiny_icnet_trains_with_multi_scale_loss():
  config = model_config(
      {'name': 'icnetBN', 'width_mult': 1 / 8, 'block_config': (1, 1, 1, 1)},
      **{'loss.aux_weights': (0.4, 0.16), 'optimizer.learning_rate': 0.05,
         'batch_size': 2, 'num_train_steps': 6})
  got = train_losses(config, 6)
  assert got[-1] < 0.7 * got[0], got


# ----------------------------------------------------------------- converter


@pytest.mark.parametrize('arch,n_keys', [
    # len(state_dict()) of upstream's icnet(is_batchnorm=False / True).
    ('icnet', 140), ('icnetBN', 408)])
def test_round_trip_and_upstream_names(arch, n_keys):
  model = get_model(arch, 5, width_mult=1 / 8)
  v = noise_variables(model, (65, 65))
  sd = convert.to_ptsemseg(v, arch)
  assert len(sd) == n_keys
  bn = arch == 'icnetBN'
  for key in ('res_block3_conv.layers.0.cb4.cb_unit.0.weight',
              'res_block3_identity.layers.2.cbr2.cbr_unit.0.weight',
              'res_block4.layers.5.cb3.cb_unit.0.weight',
              'pyramid_pooling.path_module_list.3.cbr_unit.0.weight',
              'cff_sub12.low_dilated_conv_bn.cb_unit.0.weight',
              'cff_sub24.low_classifier_conv.bias',
              'convbnrelu3_sub1.cbr_unit.0.weight', 'conv5_4_k1.cbr_unit.0.weight',
              'convbnrelu1_1.cbr_unit.0.weight', 'classification.bias'):
    assert key in sd, key
  assert ('conv5_4_k1.cbr_unit.1.running_var' in sd) == bn
  assert ('conv5_4_k1.cbr_unit.0.bias' in sd) == (not bn)
  assert sd['cff_sub24.low_dilated_conv_bn.cb_unit.0.weight'].shape == (16, 32,
                                                                       3, 3)
  module, back = convert.from_ptsemseg(sd, arch, width_mult=1 / 8)
  assert (module.pool_mode, module.repeat_res3_identity) == ('upstream', True)
  assert module.num_classes == 5 and module.is_batchnorm == bn
  fa, fb = (traverse_util.flatten_dict(dict(t)) for t in (v, back))
  assert set(fa) == set(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]))


def test_caffe_blobs_convert_without_pyramid_convs():
  names = icnet_convert.icnet_caffe_names()
  assert names['conv3_1_3x3'] == 'res_block3_conv.layers.0.cbr2.cbr_unit'
  assert names['conv3_2_1x1_reduce'] == (
      'res_block3_identity.layers.0.cbr1.cbr_unit')
  assert names['conv3_4_1x1_increase'] == (
      'res_block3_identity.layers.2.cb3.cb_unit')
  assert names['conv3_1_sub2_proj'] == 'cff_sub24.high_proj_conv_bn.cb_unit'
  assert names['conv6_sub2'] == 'cff_sub12.low_classifier_conv'
  # 14 named layers + stages of 3, 4, 6, 3 blocks (4 + 3 (n - 1) convs).
  assert len(names) == 14 + sum(3 * n + 1 for n in (3, 4, 6, 3))

  model = get_model('icnetBN', 3, width_mult=1 / 8, unused_pool_convs=False)
  v = noise_variables(model, (65, 65))
  sd = convert.to_ptsemseg(v, 'icnetBN')
  blobs = {}
  for caffe, prefix in names.items():
    conv = prefix + '.0' if prefix.endswith('_unit') else prefix
    blobs[caffe] = [sd[f'{conv}.weight']] + (
        [sd[f'{conv}.bias']] if f'{conv}.bias' in sd else [])
    if f'{prefix}.1.weight' in sd:
      blobs[f'{caffe}/bn'] = [sd[f'{prefix}.1.{s}'][None, :, None, None]
                              for s in ('weight', 'bias', 'running_mean',
                                        'running_var')]
  got = icnet_convert.icnet_from_caffe(blobs)
  assert not any(k.startswith('pyramid_pooling') for k in got)
  _, back = convert.from_ptsemseg(got, 'icnetBN', width_mult=1 / 8,
                                  unused_pool_convs=False)
  fa, fb = (traverse_util.flatten_dict(dict(t)) for t in (v, back))
  assert set(fa) == set(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]))
  with pytest.raises(ValueError, match="missing key 'pyramid_pooling"):
    convert.from_ptsemseg(got, 'icnetBN', width_mult=1 / 8)


# ------------------------------------------------- parity with pytorch-semseg

# Upstream's evaluation pooling is hard-coded for 1025x2049 inputs (a 33x65
# map). Its *training* pooling, kernel = stride = int(n / bin), works at any
# H, W = 32k + 1 with a map of at least 6x6 (input >= 161); the pyramid has
# no other train/eval difference in ICNet (its convs are never applied). So
# the oracle below runs upstream in eval mode with only `pyramid_pooling`
# in training mode, against our pool_mode='floor'. (Upstream at 1025x2049
# against pool_mode='upstream' was checked by hand; see the report.)
_ORACLE = textwrap.dedent('''
    import importlib.util, sys
    import numpy as np
    script, arch, h, w, out = sys.argv[1:]
    spec = importlib.util.spec_from_file_location('ptsemseg_oracle', script)
    oracle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(oracle)
    import torch
    torch.manual_seed(0)
    m = oracle.build(arch)
    oracle.randomise(m, 1234)
    m.eval()
    m.pyramid_pooling.train()
    x = torch.randn(1, 3, int(h), int(w),
                    generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
      y = m(x)
    sd = {'sd/' + k: v.numpy() for k, v in m.state_dict().items()
          if not k.endswith('num_batches_tracked')}
    np.savez(out, x=x.numpy(), y=y.numpy(), **sd)
''')


@pytest.mark.parametrize('arch,h,w', [
    # 1/32 maps 8x10 (floor pooling differs from adaptive) and 6x6.
    ('icnet', 225, 289), ('icnetBN', 225, 289), ('icnetBN', 161, 161)])
def test_parity_with_pytorch_semseg(arch, h, w, tmp_path):
  sd, x, ref = oracle_dump(arch, h, w, tmp_path, runner_source=_ORACLE)
  module, variables = convert.from_ptsemseg(sd, arch, pool_mode='floor')
  assert_matches_oracle(module, variables, x, ref)
