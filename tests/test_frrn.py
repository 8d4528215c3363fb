"""Tests of FRRN A / B and their converter (tiny widths; eval_shape for the
full networks).

The parity test against pytorch-semseg runs when PTSEMSEG_SRC names a
pytorch-semseg work tree and PTSEMSEG_PYTHON a python with torch (oracle:
shared/tools/ptsemseg_oracle.py beside the repository, or PTSEMSEG_ORACLE).
"""

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import frrn as frrn_config
from semseg_jax import config as config_lib
from semseg_jax import convert
from semseg_jax.convert import frrn as frrn_convert
from semseg_jax.models import get_model
from testing_utils import assert_matches_oracle
from testing_utils import model_config
from testing_utils import oracle_dump
from testing_utils import param_count
from testing_utils import train_losses

KEY = jax.random.key(0, impl='rbg')  # fast to compile on CPU
TINY = {'width_mult': 1 / 8}  # 48 -> 6, 32 lanes -> 4, 384 -> 48 channels
# Upstream stage tables (n_blocks, channels, scale), written out again here.
STAGES = {
    'A': ([(3, 96, 2), (4, 192, 4), (2, 384, 8), (2, 384, 16)],
          [(2, 192, 8), (2, 192, 4), (2, 48, 2)]),
    'B': ([(3, 96, 2), (4, 192, 4), (2, 384, 8), (2, 384, 16), (2, 384, 32)],
          [(2, 192, 16), (2, 192, 8), (2, 192, 4), (2, 48, 2)]),
}


def _variables(model, hw):
  x = jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(KEY, x, train=False), x)


def _shapes(model, hw):
  x = jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32)
  v = _variables(model, hw)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), v, x)
  return v, out


def _random_variables(model, hw, seed=0):
  """Numpy-noise variables: kernels ~ 1/sqrt(fan in), norm scales and
  variances in [0.5, 1.5], shifts and means small."""
  shapes = _variables(model, hw)
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


def _np_conv(x, p):
  """Odd square kernel, 'same' zero padding; p = {'kernel', ['bias']}."""
  k = p['kernel']
  r = k.shape[0] // 2
  h, w = x.shape[1:3]
  xp = np.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
  out = sum(np.einsum('bhwi,io->bhwo', xp[:, dy:dy + h, dx:dx + w], k[dy, dx])
            for dy in range(k.shape[0]) for dx in range(k.shape[1]))
  return out + p.get('bias', 0)


def _np_norm(x, p, s, groups):
  if groups:  # GroupNorm over (H, W, channels of the group)
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    mean = g.mean((1, 2, 4), keepdims=True)
    var = g.var((1, 2, 4), keepdims=True)
    x = ((g - mean) / np.sqrt(var + 1e-5)).reshape(x.shape)
    return x * p['gn']['scale'] + p['gn']['bias']
  x = (x - s['bn']['mean']) / np.sqrt(s['bn']['var'] + 1e-5)
  return x * p['bn']['scale'] + p['bn']['bias']


def _np_cna(x, p, s, groups, relu=True):
  x = _np_norm(_np_conv(x, p['conv']), p, s, groups)
  return np.maximum(x, 0) if relu else x


def _np_pool(x, k):
  """k x k stride-k max-pool, ceil mode (upstream's floor on its sizes)."""
  b, h, w, c = x.shape
  ho, wo = -(-h // k), -(-w // k)
  x = np.pad(x, ((0, 0), (0, ho * k - h), (0, wo * k - w), (0, 0)),
             constant_values=-np.inf)
  return x.reshape(b, ho, k, wo, k, c).max((2, 4))


def _np_resize_ac(x, hw):
  """Bilinear, align_corners=True."""
  for axis, n_out in ((1, hw[0]), (2, hw[1])):
    n_in = x.shape[axis]
    src = (np.arange(n_out) * (n_in - 1) / (n_out - 1) if n_out > 1
           else np.zeros(1))
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    wt = (src - i0).reshape([-1 if a == axis else 1 for a in range(4)])
    x = (np.take(x, i0, axis) * (1 - wt) + np.take(x, i1, axis) * wt)
  return x


def _np_frrn(v, x, model_type, share, groups):
  """FRRN's eval-mode forward pass written directly in numpy."""
  p, st = v['params'], v.get('batch_stats', {})
  get = lambda name: (p[name], st.get(name, {}))

  def ru(x, name):
    q, s = get(name)
    h = _np_cna(x, q['conv1'], s.get('conv1'), groups)
    return x + _np_cna(h, q['conv2'], s.get('conv2'), groups, relu=False)

  def frru(y, z, name, scale):
    q, s = get(name)
    y = np.concatenate([y, _np_pool(z, scale)], -1)
    y = _np_cna(y, q['conv1'], s.get('conv1'), groups)
    y = _np_cna(y, q['conv2'], s.get('conv2'), groups)
    r = _np_conv(y, q['conv_res']).repeat(scale, 1).repeat(scale, 2)
    return y, z + r[:, :z.shape[1], :z.shape[2]]

  hw = x.shape[1:3]
  q, s = get('conv1')
  x = _np_cna(x, q, s, groups)
  for i in range(3):
    x = ru(x, f'in_ru{i}')
  y, z = x, _np_conv(x, p['split_conv'])
  encoder, decoder = STAGES[model_type]
  for part, stages in (('enc', encoder), ('dec', decoder)):
    for i, (n, _, scale) in enumerate(stages):
      if part == 'enc':
        y_in = _np_pool(y, 2)
      else:
        y_in = _np_resize_ac(y, [-(-d // scale) for d in hw])
      y = y_in
      for b in range(n):
        y, z = frru(y_in if share else y, z, f'{part}{i}_{b}', scale)
  x = np.concatenate([_np_resize_ac(y, hw), z], -1)
  x = _np_conv(x, p['merge_conv'])
  for i in range(3):
    x = ru(x, f'out_ru{i}')
  return _np_conv(x, p['classif_conv'])


@pytest.mark.parametrize('name,hw,kwargs', [
    # Paper wiring at a size upstream rejects (not a multiple of 16).
    ('frrnA', (35, 21), {}),
    # Upstream wiring with GroupNorm, on a size upstream accepts.
    ('frrnB', (32, 64), {'share_pooled_input': True, 'group_norm': True,
                         'n_groups': 2}),
])
def test_matches_numpy_reference(name, hw, kwargs):
  model = get_model(name, 5, **TINY, **kwargs)
  v = _random_variables(model, hw)
  x = np.random.default_rng(1).standard_normal((2, *hw, 3)).astype(np.float32)
  y = jax.jit(lambda v, x: model.apply(v, x, train=False).logits)(v, x)
  np_v = jax.tree.map(lambda a: np.asarray(a, np.float64), v)
  ref = _np_frrn(np_v, x.astype(np.float64), name[-1],
                 kwargs.get('share_pooled_input', False),
                 kwargs.get('n_groups') if kwargs.get('group_norm') else 0)
  assert y.shape == ref.shape == (2, *hw, 5)
  np.testing.assert_allclose(np.asarray(y), ref,
                             atol=1e-4 * np.abs(ref).max(), rtol=0)


# ---------------------------------------------------------- shapes and sizes


def _chaining_extra(model_type):
  """Extra conv1 weights when blocks chain: block b > 0 of a stage reads
  ``channels + 32`` instead of ``prev_channels + 32`` inputs (3x3 convs)."""
  extra, prev = 0, 48
  encoder, decoder = STAGES[model_type]
  for n, c, _ in encoder + decoder:
    extra += (n - 1) * 9 * (c - prev) * c
    prev = c
  return extra


@pytest.mark.parametrize('name,count', [
    # Upstream frrn(21, model_type=...) parameter counts.
    ('frrnA', 16_559_173), ('frrnB', 23_568_069)])
@pytest.mark.parametrize('group_norm', [False, True])
def test_upstream_parameter_count(name, count, group_norm):
  v = _variables(get_model(name, 21, share_pooled_input=True,
                           group_norm=group_norm), (32, 32))
  assert param_count(v['params']) == count
  encoder, decoder = STAGES[name[-1]]
  norm_channels = 48 + 4 * 3 * 48 + sum(2 * n * c for n, c, _ in
                                        encoder + decoder)
  if group_norm:
    assert 'batch_stats' not in v
  else:
    assert param_count(v['batch_stats']) == 2 * norm_channels
  v = _variables(get_model(name, 21, group_norm=group_norm), (32, 32))
  assert param_count(v['params']) == count + _chaining_extra(name[-1])


def test_paper_wiring_vs_upstream_wiring():
  # Second FRRU of stage 1 (192 channels, after 96): its conv1 reads the first
  # block's 24 (chained) or the pooled 12 (upstream) plus 4 lane channels.
  k = lambda v: v['params']['enc1_1']['conv1']['conv']['kernel'].shape
  v = _variables(get_model('frrnA', 3, **TINY), (32, 32))
  assert k(v) == (3, 3, 24 + 4, 24)
  v = _variables(get_model('frrnA', 3, share_pooled_input=True, **TINY),
                 (32, 32))
  assert k(v) == (3, 3, 12 + 4, 24)
  assert 'enc4_0' not in v['params'] and 'dec3_0' not in v['params']
  v = _variables(get_model('frrnB', 3, **TINY), (32, 32))
  assert 'enc4_1' in v['params'] and 'dec3_1' in v['params']


@pytest.mark.parametrize('name,hw', [('frrnA', (1, 1)), ('frrnA', (37, 53)),
                                     ('frrnB', (37, 53)), ('frrnB', (64, 32))])
def test_logits_at_input_resolution(name, hw):
  _, out = _shapes(get_model(name, 3, **TINY), hw)
  assert out.logits.shape == (1, *hw, 3)
  assert out.logits.dtype == jnp.float32 and out.aux == ()


def test_bad_options():
  with pytest.raises(ValueError, match='n_groups=4 must divide .* 6 is not'):
    _shapes(get_model('frrnA', 3, group_norm=True, n_groups=4, **TINY),
            (32, 32))
  with pytest.raises(ValueError, match='NHWC'):
    _shapes(get_model('frrnA', 3, **TINY), (32,))
  with pytest.raises(ValueError, match="no option 'model_type'"):
    get_model('frrnA', 3, model_type='B')


def test_bfloat16_compute_float32_params_and_logits():
  v, out = _shapes(get_model('frrnB', 3, dtype=jnp.bfloat16, **TINY),
                   (32, 32))
  assert {a.dtype for a in jax.tree.leaves(v)} == {jnp.dtype(jnp.float32)}
  assert out.logits.dtype == jnp.float32


# ------------------------------------------------------------------ training


def test_trains_on_shapes():
  config = model_config({'name': 'frrnA', 'width_mult': 1 / 8},
                        **{'optimizer.name': 'adam',
                           'optimizer.learning_rate': 5e-3,
                           'optimizer.weight_decay': 0.0,
                           'schedule.name': 'constant'})
  losses = train_losses(config, 8)
  assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize('arg,name,bootstrap_k,hw', [
    (None, 'frrnB', 512 * 64, (512, 1024)),
    ('A', 'frrnA', 512 * 32, (256, 512)),
])
def test_config(arg, name, bootstrap_k, hw):
  config = frrn_config.get_config(arg)
  config_lib.validate_config(config)
  assert config.model.name == name and config.num_classes == 19
  assert config.loss.name == 'bootstrapped_cross_entropy'
  assert config.loss.bootstrap_k == bootstrap_k
  assert tuple(config.dataset.image_size) == hw
  reference = get_model(name, 19)
  options = {k: v for k, v in config.model.items() if k != 'name'}
  assert options == {f: getattr(reference, f) for f in options}
  assert set(options) == {'group_norm', 'n_groups', 'share_pooled_input',
                          'width_mult'}
  with pytest.raises(ValueError, match="'C'"):
    frrn_config.get_config('C')


# ----------------------------------------------------------------- converter


def _assert_trees_equal(a, b):
  fa, fb = (traverse_util.flatten_dict(dict(t)) for t in (a, b))
  assert set(fa) == set(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]),
                                  err_msg=str(k))


@pytest.mark.parametrize('arch,n_keys', [
    # len(frrn(K, model_type, group_norm).state_dict()) upstream.
    ('frrnA', 321), ('frrnB', 377), ('frrnA_gn', 180), ('frrnB_gn', 212)])
def test_round_trip_and_upstream_names(arch, n_keys):
  gn = arch.endswith('_gn')
  kw = dict(TINY, n_groups=2) if gn else TINY
  model = get_model(arch[:5], 4, share_pooled_input=True, group_norm=gn, **kw)
  v = _random_variables(model, (32, 32))
  sd = convert.to_ptsemseg(v, arch)
  assert len(sd) == n_keys
  if gn:
    expected = {'conv1.cgr_unit.0.bias', 'conv1.cgr_unit.1.weight',
                'up_residual_units.2.conv2.cg_unit.1.bias',
                'decoding_frru_2_48_2_1.conv2.cgr_unit.1.weight'}
    assert not any('running' in k or 'tracked' in k for k in sd)
  else:
    expected = {'conv1.cbr_unit.0.bias',
                'encoding_frru_4_192_4_3.conv1.cbr_unit.1.running_var',
                'down_residual_units.0.conv2.cb_unit.1.num_batches_tracked',
                'decoding_frru_2_48_2_1.conv_res.bias'}
  assert expected <= set(sd)
  assert 'split_conv.weight' in sd and 'split_conv.bias' not in sd
  assert 'merge_conv.bias' not in sd and 'classif_conv.bias' in sd
  np.testing.assert_array_equal(
      sd['encoding_frru_3_96_2_2.conv_res.weight'],
      np.asarray(v['params']['enc0_2']['conv_res']['kernel']).transpose(
          3, 2, 0, 1))
  module, back = convert.from_ptsemseg(sd, arch, **kw)
  assert module.share_pooled_input and module.group_norm == gn
  assert module.num_classes == 4
  _assert_trees_equal(back, v)


def test_upstream_model_type_and_mislabelled_checkpoints():
  shapes = {n: _variables(get_model(n, 3, share_pooled_input=True, **TINY),
                          (32, 32)) for n in ('frrnA', 'frrnB')}
  sds = {n: convert.to_ptsemseg(
      jax.tree.map(lambda s: np.zeros(s.shape, np.float32), v), n)
         for n, v in shapes.items()}
  assert frrn_convert.upstream_model_type(sds['frrnA']) == 'A'
  b_sd = {'module.' + k: a for k, a in sds['frrnB'].items()}
  assert frrn_convert.upstream_model_type(b_sd) == 'B'
  with pytest.raises(ValueError, match='not an upstream FRRN'):
    frrn_convert.upstream_model_type({'conv1.weight': 0})
  # An upstream "frrnA" checkpoint holding B weights, converted as A: B's
  # second decoder stage has A's first stage's name but reads 192 channels.
  with pytest.raises(ValueError, match=r"frrnA: key 'decoding_frru_2_192_8_0"
                     r"\.conv1\.cbr_unit\.0\.weight' has shape "
                     r'\(24, 28, 3, 3\)'):
    convert.from_ptsemseg(sds['frrnB'], 'frrnA', **TINY)


# ------------------------------------------------- parity with pytorch-semseg


@pytest.mark.parametrize('arch,h,w', [('frrnA', 32, 48), ('frrnB', 64, 32)])
def test_parity_with_pytorch_semseg(arch, h, w, tmp_path):
  # The oracle builds upstream's frrn(21, model_type=arch[-1]), i.e. real A.
  sd, x, ref = oracle_dump(arch, h, w, tmp_path)
  module, variables = convert.from_ptsemseg(sd, arch)
  # Measured: 1.5e-6 (A) and 1.1e-6 (B) of the logit scale.
  assert_matches_oracle(module, variables, x, ref)
