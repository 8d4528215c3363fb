"""Tests of semseg_jax.models.layers against independent numpy references."""
import contextlib
import functools
import itertools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semseg_jax.models import cpu_conv
from semseg_jax.models import layers


def _rng(seed=0):
  return np.random.default_rng(seed)


# ---------------------------------------------------------------- references


def np_conv2d(x, w, b, stride, pad, dil):
  """torch Conv2d: x [B,H,W,I], w [O,I,kh,kw] (torch layout), correlation."""
  bsz, h, wd, _ = x.shape
  o, _, kh, kw = w.shape
  xp = np.pad(x, ((0, 0), (pad[0], pad[0]), (pad[1], pad[1]), (0, 0)))
  oh = (h + 2 * pad[0] - dil[0] * (kh - 1) - 1) // stride[0] + 1
  ow = (wd + 2 * pad[1] - dil[1] * (kw - 1) - 1) // stride[1] + 1
  out = np.zeros((bsz, oh, ow, o), np.float64)
  for i in range(oh):
    for j in range(ow):
      for u in range(kh):
        for v in range(kw):
          patch = xp[:, i * stride[0] + u * dil[0], j * stride[1] + v * dil[1]]
          out[:, i, j] += patch @ w[:, :, u, v].T
  return out + (0 if b is None else b)


def np_conv_transpose2d(x, w, b, stride, pad, out_pad, dil):
  """torch ConvTranspose2d by scatter-add: w [I,O,kh,kw] (torch layout)."""
  bsz, h, wd, _ = x.shape
  _, o, kh, kw = w.shape
  full_h = (h - 1) * stride[0] + dil[0] * (kh - 1) + 1 + out_pad[0]
  full_w = (wd - 1) * stride[1] + dil[1] * (kw - 1) + 1 + out_pad[1]
  out = np.zeros((bsz, full_h, full_w, o), np.float64)
  for i in range(h):
    for j in range(wd):
      for u in range(kh):
        for v in range(kw):
          out[:, i * stride[0] + u * dil[0], j * stride[1] + v * dil[1]] += (
              x[:, i, j] @ w[:, :, u, v])
  out = out[:, pad[0]:full_h - pad[0], pad[1]:full_w - pad[1]]
  return out + (0 if b is None else b)


def np_pool_argmax(x, k, s, p, ceil_mode):
  """torch MaxPool2d(return_indices=True) on [B,H,W,C], loops."""
  bsz, h, w, c = x.shape

  def out_len(n, k, s, p):
    o = (n + 2 * p - k + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (o - 1) * s >= n + p:
      o -= 1
    return o

  oh, ow = out_len(h, k[0], s[0], p[0]), out_len(w, k[1], s[1], p[1])
  y = np.zeros((bsz, oh, ow, c), x.dtype)
  idx = np.zeros((bsz, oh, ow, c), np.int64)
  for bb, i, j, cc in itertools.product(range(bsz), range(oh), range(ow),
                                        range(c)):
    best, arg = -np.inf, -1
    for u in range(k[0]):
      for v in range(k[1]):
        r, q = i * s[0] - p[0] + u, j * s[1] - p[1] + v
        if 0 <= r < h and 0 <= q < w and x[bb, r, q, cc] > best:
          best, arg = x[bb, r, q, cc], r * w + q
    y[bb, i, j, cc], idx[bb, i, j, cc] = best, arg
  return y, idx


def np_bilinear(x, oh, ow, align_corners):
  """torch bilinear interpolate on [B,H,W,C] in float64, loops."""
  h, w = x.shape[1:3]

  def src(dst, n_in, n_out):
    if align_corners:
      return dst * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    return max((dst + 0.5) * n_in / n_out - 0.5, 0.0)

  out = np.zeros((x.shape[0], oh, ow, x.shape[3]))
  for i in range(oh):
    sy = src(i, h, oh)
    y0 = min(int(np.floor(sy)), h - 1)
    y1, ly = min(y0 + 1, h - 1), sy - y0
    for j in range(ow):
      sx = src(j, w, ow)
      x0 = min(int(np.floor(sx)), w - 1)
      x1, lx = min(x0 + 1, w - 1), sx - x0
      out[:, i, j] = ((1 - ly) * ((1 - lx) * x[:, y0, x0] + lx * x[:, y0, x1])
                      + ly * ((1 - lx) * x[:, y1, x0] + lx * x[:, y1, x1]))
  return out


# ------------------------------------------------------------ bilinear kernel


def test_bilinear_kernel_values():
  k4 = layers.bilinear_kernel(4, 3, 3)
  tri = np.array([0.25, 0.75, 0.75, 0.25])
  assert k4.shape == (4, 4, 3, 3) and k4.dtype == np.float32
  for c in range(3):
    np.testing.assert_allclose(k4[:, :, c, c], np.outer(tri, tri))
  off = k4.copy()
  for c in range(3):
    off[:, :, c, c] = 0
  assert not off.any()
  np.testing.assert_allclose(layers.bilinear_kernel(3, 1, 1)[:, :, 0, 0],
                             np.outer([.5, 1, .5], [.5, 1, .5]))
  # Rectangular: diagonal of the leading square only.
  k = layers.bilinear_kernel(2, 2, 3)
  assert k[:, :, 1, 1].sum() > 0 and not k[:, :, :, 2].any()


def test_bilinear_kernel_upsamples_linearly():
  # Transposed conv with the k=4, s=2, p=1 filter is 2x linear interpolation:
  # a linear ramp stays a linear ramp (away from the zero-padded border).
  x = np.arange(8, dtype=np.float32)[None, None, :, None] * np.ones(
      (1, 8, 1, 1), np.float32)
  mod = layers.ConvTranspose(1, 4, 2, padding=1, use_bias=False,
                             kernel_init=layers.bilinear_init())
  v = mod.init(jax.random.key(0), x)
  y = np.asarray(mod.apply(v, x))[0, 4, :, 0]
  assert y.shape == (16,)
  np.testing.assert_allclose(np.diff(y[1:-1]), 0.5, atol=1e-6)
  np.testing.assert_allclose(y[1:-1], np.arange(1, 15) / 2 - 0.25, atol=1e-6)


def test_bilinear_init_rejects_non_square():
  with pytest.raises(ValueError, match='square'):
    layers.bilinear_init()(jax.random.key(0), (3, 4, 2, 2))


# -------------------------------------------------------------- convolutions


@pytest.mark.parametrize('k,s,p,op,d', [
    (4, 2, 0, 0, 1), (4, 2, 1, 0, 1), (3, 2, 1, 1, 1), (2, 2, 0, 0, 1),
    (3, 1, 0, 0, 2), (3, 3, 2, 2, 1), ((3, 2), (2, 1), (1, 0), (1, 0), (1, 2)),
    (2, 2, 3, 0, 1),  # padding > d*(k-1): negative conv padding (a crop)
])
def test_conv_transpose_matches_torch_reference(k, s, p, op, d):
  r = _rng(1)
  pair = lambda v: (v, v) if isinstance(v, int) else v
  kp, sp, pp, opp, dp = map(pair, (k, s, p, op, d))
  x = r.standard_normal((2, 5, 6, 3)).astype(np.float32)
  w_torch = r.standard_normal((3, 4, *kp)).astype(np.float32)  # [I,O,kh,kw]
  b = r.standard_normal(4).astype(np.float32)
  mod = layers.ConvTranspose(4, k, s, padding=p, output_padding=op,
                             kernel_dilation=d)
  kernel = w_torch.transpose(2, 3, 0, 1)
  y = mod.apply({'params': {'kernel': kernel, 'bias': b}}, x)
  ref = np_conv_transpose2d(x, w_torch, b, sp, pp, opp, dp)
  assert y.shape == ref.shape
  np.testing.assert_allclose(np.asarray(y), ref, atol=1e-4)
  # And against jax.lax.conv_transpose (forward-conv kernel layout).
  pads = [(dp[i] * (kp[i] - 1) - pp[i], dp[i] * (kp[i] - 1) - pp[i] + opp[i])
          for i in range(2)]
  lax_y = jax.lax.conv_transpose(x, np.swapaxes(kernel, 2, 3), sp, pads,
                                 rhs_dilation=dp, transpose_kernel=True,
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(np.asarray(y), np.asarray(lax_y) + b, atol=1e-4)


@pytest.mark.parametrize('k,s,p,op', [
    (2, 2, 0, 0), (4, 2, 1, 0), (3, 2, 1, 1), (16, 8, 0, 0), (5, 3, 2, 2),
    (2, 2, 0, 1), ((3, 4), (2, 3), (1, 0), (1, 2)), (2, 2, 3, 0),
])
def test_conv_transpose_phases_equal_dilated_input_form(k, s, p, op):
  # XLA:CPU computes transposed convs phase by phase; values and both
  # gradients must equal the dilated-input convolution used elsewhere.
  pair = lambda v: (v, v) if isinstance(v, int) else v
  kp, sp, pp, opp = map(pair, (k, s, p, op))
  r = _rng(12)
  x = jnp.asarray(r.standard_normal((2, 5, 6, 3)), jnp.float32)
  w = jnp.asarray(r.standard_normal((*kp, 3, 4)), jnp.float32)
  dilated = lambda x, w: layers._conv_transpose_lhs_dilated(
      x, w, sp, pp, opp, (1, 1))
  phases = lambda x, w: layers._conv_transpose_phases(x, w, sp, pp, opp)
  ref = dilated(x, w)
  got = phases(x, w)
  assert got.shape == ref.shape
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  cot = jnp.asarray(r.standard_normal(ref.shape), jnp.float32)
  for a, b in zip(jax.vjp(phases, x, w)[1](cot), jax.vjp(dilated, x, w)[1](cot)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
  # On CPU the compiled ConvTranspose has no input dilation left.
  mod = layers.ConvTranspose(4, k, s, padding=p, output_padding=op)
  v = mod.init(jax.random.key(0), x)
  np.testing.assert_allclose(mod.apply(v, x) - v['params']['bias'],
                             dilated(x, v['params']['kernel']), rtol=1e-5,
                             atol=1e-5)
  hlo = jax.jit(jax.grad(lambda v: jnp.sum(mod.apply(v, x) * cot))).lower(
      v).compile().as_text()
  if jax.default_backend() == 'cpu':
    assert 'lhs_dilate' not in hlo


def _assert_close(got, ref, tol):
  """Each array of ``got`` has its ``ref`` twin's shape and dtype and is
  within ``tol`` of it relative to the twin's largest magnitude."""
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype
    b = np.asarray(b, np.float32)
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=tol,
                               atol=tol * np.abs(b).max())


def _assert_same_vjp(form, ref, x, w, rng, tol):
  """``form``'s values and gradients in ``x`` and ``w`` (under one random
  cotangent from ``rng``) equal ``ref``'s (:func:`_assert_close`)."""
  y, vjp_ref = jax.vjp(ref, x, w)
  got, vjp_got = jax.vjp(form, x, w)
  cot = jnp.asarray(rng.standard_normal(y.shape), y.dtype)
  _assert_close((got, vjp_got(cot)), (y, vjp_ref(cot)), tol)


def _hlo(fn, *args, platform):
  """``fn`` jitted and exported for ``platform`` (no device needed), as
  StableHLO text."""
  from jax import export  # pylint: disable=import-outside-toplevel
  return export.export(jax.jit(fn), platforms=(platform,))(
      *args).mlir_module()


@pytest.mark.parametrize('k,s,p,op,dtype', [
    (2, 2, 0, 0, 'float32'), (4, 2, 1, 0, 'float32'),
    (3, 2, 1, 1, 'float32'), (16, 8, 0, 0, 'float32'),
    ((3, 4), (2, 3), (1, 0), (1, 2), 'float32'), (2, 2, 3, 0, 'float32'),
    (4, 2, 0, 0, 'bfloat16'),
])
def test_conv_transpose_native_gradient_equals_autodiff(k, s, p, op, dtype):
  # GPU/TPU form: the dilated-input forward with the strided convolution's
  # backward-filter as its kernel gradient. Same values and gradients as
  # JAX's own autodiff of the dilated-input form.
  pair = lambda v: (v, v) if isinstance(v, int) else v
  kp, sp, pp, opp = map(pair, (k, s, p, op))
  r = _rng(13)
  dt = jnp.dtype(dtype)
  x = jnp.asarray(r.standard_normal((2, 5, 6, 3)), dt)
  w = jnp.asarray(r.standard_normal((*kp, 3, 4)), dt)
  dilated = lambda x, w: layers._conv_transpose_lhs_dilated(
      x, w, sp, pp, opp, (1, 1))
  native = lambda x, w: layers._conv_transpose_native(x, w, sp, pp, opp)
  np.testing.assert_array_equal(np.asarray(native(x, w), np.float32),
                                np.asarray(dilated(x, w), np.float32))
  _assert_same_vjp(native, dilated, x, w, r,
                   1e-5 if dtype == 'float32' else 2e-2)


@contextlib.contextmanager
def _plain_gradients():
  """``set_cpu_conv_gradients(False)`` for the block, restored after."""
  layers.set_cpu_conv_gradients(False)
  try:
    yield
  finally:
    layers.set_cpu_conv_gradients(True)


def _jvp_shape(apply, variables, x):
  """The tangent's shape of ``apply(variables, x)`` under ``jax.jvp``
  (raises where a custom VJP is in the way)."""
  tangent = jax.tree.map(jnp.ones_like, variables)
  _, t = jax.jvp(lambda v: apply(v, x), (variables,), (tangent,))
  return t.shape


def _exported_convs(fn, *args, platform):
  """The stablehlo.convolution lines of ``fn`` lowered for ``platform``."""
  return [l for l in _hlo(fn, *args, platform=platform).splitlines()
          if 'stablehlo.convolution' in l]


@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
def test_conv_transpose_kernel_gradient_is_backward_filter_off_cpu(platform):
  # Lowered for a GPU/TPU (no device needed), ConvTranspose's kernel
  # gradient is the strided convolution's weight gradient (window dilation
  # = stride: cuDNN's backward filter), not a convolution over the
  # zero-inserted input (input dilation) as JAX's own rule gives; with
  # set_cpu_conv_gradients(False) it is JAX's rule again.
  mod = layers.ConvTranspose(4, 4, 2, padding=1)
  x = jnp.asarray(_rng(14).standard_normal((2, 5, 6, 3)), jnp.float32)
  v = mod.init(jax.random.key(0), x)
  grads = lambda: jax.grad(lambda v, x: jnp.sum(mod.apply(v, x) ** 2),
                          (0, 1))  # a new function: traced afresh
  convs = _exported_convs(grads(), v, x, platform=platform)
  # Forward (input-dilated), input gradient (strided), kernel gradient.
  assert len(convs) == 3
  assert sum('lhs_dilate' in c for c in convs) == 1
  assert sum('rhs_dilate = [2, 2]' in c for c in convs) == 1
  with _plain_gradients():
    convs = _exported_convs(grads(), v, x, platform=platform)
    assert sum('lhs_dilate' in c for c in convs) == 2
    # Without the custom rule, forward-mode autodiff works.
    assert _jvp_shape(mod.apply, v, x) == (2, 10, 12, 4)


@pytest.mark.parametrize('k,s,pads,d,dtype', [
    (3, (1, 1), ((100, 100), (100, 100)), (1, 1), 'float32'),  # FCN conv1_1
    (3, (2, 1), ((5, 3), (0, 4)), (1, 1), 'float32'),
    ((3, 2), (1, 1), ((6, 6), (2, 2)), (2, 1), 'float32'),
    (3, (1, 1), ((100, 100), (100, 100)), (1, 1), 'bfloat16'),
])
def test_patches_conv_equals_conv(k, s, pads, d, dtype):
  # The off-CPU form of narrow convolutions with padding wider than the
  # kernel: im2col patches times the kernel, same values and gradients.
  kp = (k, k) if isinstance(k, int) else k
  r = _rng(15)
  dt = jnp.dtype(dtype)
  x = jnp.asarray(r.standard_normal((2, 11, 13, 3)), dt)
  w = jnp.asarray(r.standard_normal((*kp, 3, 5)), dt)
  kw = dict(rhs_dilation=d, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  ref = lambda x, w: jax.lax.conv_general_dilated(x, w, s, pads, **kw)
  got = lambda x, w: cpu_conv._fwd_cols(x, w, pads, d, strides=s)
  _assert_same_vjp(got, ref, x, w, r, 1e-5 if dtype == 'float32' else 2e-2)


@pytest.mark.parametrize('c_in,padding,patches', [
    (3, 100, True),    # FCN's conv1_1
    (3, 1, False),     # padding within the kernel's reach
    (3, 3, True),
    (8, 100, False),   # 3 * 3 * 8 = 72 > 64 input values per window
])
def test_wide_padding_rule_off_cpu(c_in, padding, patches):
  # Lowered for GPU/TPU, layers.conv computes a narrow convolution with
  # padding beyond the kernel's reach from patches (a dot_general and no
  # convolution, in the forward and the weight gradient); lowered for CPU
  # it stays a convolution.
  m = layers.conv(4, 3, padding=padding)
  x = jnp.asarray(_rng(16).standard_normal((1, 9, 10, c_in)), jnp.float32)
  v = m.init(jax.random.key(0), x)
  ref = jax.lax.conv_general_dilated(
      x, v['params']['kernel'], (1, 1), [(padding, padding)] * 2,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + v['params']['bias']
  np.testing.assert_allclose(m.apply(v, x), ref, rtol=1e-5, atol=1e-5)
  grad = lambda: jax.grad(lambda v: jnp.sum(m.apply(v, x) ** 2))
  for platform in ('cuda', 'tpu', 'cpu'):
    text = _hlo(grad(), v, platform=platform)
    convs = text.count('stablehlo.convolution')
    dots = text.count('stablehlo.dot_general')
    if patches and platform != 'cpu':
      assert (convs, dots) == (0, 2), platform
    else:
      assert convs >= 2 and dots == 0, platform


@pytest.mark.parametrize('hw,k,pads,d,dtype', [
    ((12, 12), 3, ((2, 2), (2, 2)), (2, 2), 'float32'),   # PSPNet layer3
    ((11, 13), 3, ((4, 4), (4, 4)), (4, 4), 'float32'),   # H, W not d * n
    ((9, 10), 3, ((2, 2), (3, 3)), (2, 3), 'float32'),
    ((10, 10), 3, ((3, 1), (0, 5)), (3, 3), 'float32'),   # asymmetric
    ((15, 15), 3, ((0, 0), (0, 0)), (2, 2), 'float32'),   # VALID
    ((20, 17), (5, 3), ((4, 4), (2, 2)), (2, 2), 'float32'),
    ((12, 12), 3, ((2, 2), (2, 2)), (2, 2), 'bfloat16'),
])
def test_atrous_phases_equal_the_dilated_conv(hw, k, pads, d, dtype):
  # Space to batch: the atrous convolution as a dense one over its phases,
  # same values and gradients; and the CUDA rule's mix (XLA's forward, the
  # phases' gradients) too.
  kp = (k, k) if isinstance(k, int) else k
  r = _rng(17)
  dt = jnp.dtype(dtype)
  x = jnp.asarray(r.standard_normal((2, *hw, 5)), dt)
  w = jnp.asarray(r.standard_normal((*kp, 5, 6)) / 4, dt)
  ref = functools.partial(
      jax.lax.conv_general_dilated, window_strides=(1, 1), padding=pads,
      rhs_dilation=d, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  phases = functools.partial(cpu_conv._conv_phases, pads=pads, dil=d)
  mixed = functools.partial(cpu_conv._forward_with_gradient_of, ref, phases)
  for form in (phases, mixed):
    _assert_same_vjp(form, ref, x, w, r, 1e-5 if dtype == 'float32' else 2e-2)


def test_atrous_rule_on_cuda():
  # Lowered for CUDA, an atrous layers.conv keeps XLA's dilated forward and
  # takes the phases' (dense) convolutions for its gradients; TPU and CPU
  # keep a dilated input gradient. Without custom gradients CUDA runs the phases
  # throughout, and forward mode works.
  m = layers.conv(4, 3, padding=2, dilation=2)
  x = jnp.asarray(_rng(18).standard_normal((2, 12, 11, 3)), jnp.float32)
  v = m.init(jax.random.key(0), x)
  grad = lambda v, x: jax.grad(lambda v, x: jnp.sum(m.apply(v, x) ** 2),  # noqa: E731
                               (0, 1))(v, x)
  dilated = lambda text: [l for l in text.splitlines()  # noqa: E731
                          if 'stablehlo.convolution' in l
                          and 'rhs_dilate = [2, 2]' in l]
  assert len(dilated(_hlo(m.apply, v, x, platform='cuda'))) == 1
  # The forward (the loss needs it) is the only dilated one; the input and
  # kernel gradients are dense convolutions of the phases.
  text = _hlo(grad, v, x, platform='cuda')
  assert len(dilated(text)) == 1 and text.count('stablehlo.convolution') == 3
  for platform in ('tpu', 'cpu'):
    assert len(dilated(_hlo(grad, v, x, platform=platform))) == 2, platform
  with _plain_gradients():
    assert not dilated(_hlo(m.apply, v, x, platform='cuda'))
    assert _jvp_shape(m.apply, v, x) == (2, 12, 11, 4)


def test_wide_kernel_rule_on_cuda():
  # FCN's fc6 (7x7 over >= 256 channels), lowered for CUDA: the forward is
  # the patches' matmul (no convolution), the gradients XLA's convolutions;
  # TPU keeps the convolution. Values and gradients as the convolution's.
  m = layers.conv(8, 7)
  x = jnp.asarray(_rng(19).standard_normal((2, 9, 8, 256)), jnp.float32)
  v = m.init(jax.random.key(0), x)
  loss = lambda v, x: jnp.sum(m.apply(v, x) ** 2)  # noqa: E731
  grad = jax.grad(loss, (0, 1))
  text = _hlo(m.apply, v, x, platform='cuda')
  assert 'stablehlo.convolution' not in text and 'dot_general' in text
  assert _hlo(grad, v, x, platform='cuda').count('stablehlo.convolution') == 2
  assert 'stablehlo.convolution' in _hlo(m.apply, v, x, platform='tpu')
  k = v['params']['kernel']
  plain = functools.partial(
      jax.lax.conv_general_dilated, window_strides=(1, 1),
      padding=((0, 0), (0, 0)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  cols = functools.partial(cpu_conv._fwd_cols, pads=((0, 0), (0, 0)),
                           dil=(1, 1))
  mixed = functools.partial(cpu_conv._forward_with_gradient_of, cols, plain)
  _assert_same_vjp(mixed, plain, x, k, _rng(20), 1e-4)


def test_conv_transpose_output_padding_must_be_small():
  with pytest.raises(ValueError, match='output_padding'):
    layers.ConvTranspose(2, 3, 2, output_padding=2).init(
        jax.random.key(0), jnp.zeros((1, 4, 4, 1)))


@pytest.mark.parametrize('k,s,p,d', [
    (3, 1, 1, 1), (3, 1, 2, 2), (3, 2, 4, 4), ((3, 1), (1, 2), (0, 1), (2, 1)),
    (7, 1, 0, 1), (1, 1, 0, 1),
])
def test_conv_is_torch_conv2d(k, s, p, d):
  r = _rng(2)
  pair = lambda v: (v, v) if isinstance(v, int) else v
  x = r.standard_normal((2, 9, 11, 3)).astype(np.float32)
  kp = pair(k)
  w_torch = r.standard_normal((5, 3, *kp)).astype(np.float32)
  b = r.standard_normal(5).astype(np.float32)
  mod = layers.conv(5, k, s, p, d)
  y = mod.apply({'params': {'kernel': w_torch.transpose(2, 3, 1, 0),
                            'bias': b}}, x)
  ref = np_conv2d(x, w_torch, b, pair(s), pair(p), pair(d))
  assert y.shape == ref.shape
  np.testing.assert_allclose(np.asarray(y), ref, atol=1e-4)


def test_conv_padding_forms():
  x = jnp.zeros((1, 8, 8, 1))
  shape = lambda m: jax.eval_shape(lambda: m.init(jax.random.key(0), x))
  assert layers.conv(2, 3, padding='same').apply(
      jax.tree.map(jnp.zeros_like, layers.conv(2, 3).init(
          jax.random.key(0), x)), x).shape == (1, 8, 8, 2)
  v = shape(layers.conv(2, 3, padding=((1, 0), (2, 2))))
  assert v['params']['kernel'].shape == (3, 3, 1, 2)
  with pytest.raises(ValueError, match='padding'):
    layers.conv(2, 3, padding=(1, 2, 3))


def test_conv_bn_act_eval_and_train():
  r = _rng(3)
  x = r.standard_normal((4, 6, 6, 2)).astype(np.float32) * 3 + 1
  mod = layers.ConvBNAct(3, 3, padding=1, act=None)
  v = mod.init(jax.random.key(0), x, train=False)
  assert set(v) == {'params', 'batch_stats'}
  assert set(v['params']) == {'conv', 'bn'}
  # Eval: running statistics, PyTorch formula.
  stats = {'mean': r.standard_normal(3).astype(np.float32),
           'var': (0.5 + r.random(3)).astype(np.float32)}
  params = {'conv': v['params']['conv'],
            'bn': {'scale': (1 + r.random(3)).astype(np.float32),
                   'bias': r.standard_normal(3).astype(np.float32)}}
  y = mod.apply({'params': params, 'batch_stats': {'bn': stats}}, x,
                train=False)
  c = np.asarray(layers.conv(3, 3, padding=1).apply(
      {'params': params['conv']}, x))
  ref = ((c - stats['mean']) / np.sqrt(stats['var'] + 1e-5)
         * params['bn']['scale'] + params['bn']['bias'])
  np.testing.assert_allclose(np.asarray(y), ref, atol=1e-4)
  # Train: batch statistics; running mean moves 10% (torch momentum 0.1).
  y, upd = mod.apply({'params': params, 'batch_stats': {'bn': stats}}, x,
                     train=True, mutable=['batch_stats'])
  bm = c.mean(axis=(0, 1, 2))
  np.testing.assert_allclose(upd['batch_stats']['bn']['mean'],
                             0.9 * stats['mean'] + 0.1 * bm, atol=1e-4)
  z = (np.asarray(y) - params['bn']['bias']) / params['bn']['scale']
  np.testing.assert_allclose(z.mean(axis=(0, 1, 2)), 0, atol=1e-4)
  np.testing.assert_allclose(z.std(axis=(0, 1, 2)), 1, atol=1e-3)


@pytest.mark.parametrize('relu,dtype', [(False, 'float32'), (True, 'float32'),
                                        (True, 'bfloat16')])
def test_batch_norm_equals_flax(relu, dtype):
  """layers.BatchNorm (ConvBNAct's) against flax's BatchNorm (+ ReLU): the
  same variables, outputs, running statistics, and gradients in x, scale
  and bias (the written-out CPU rule), in training and in eval."""
  r = _rng(21)
  dt = jnp.dtype(dtype)
  x = jnp.asarray(r.standard_normal((3, 5, 7, 6)) * 2 + 1.5, dt)
  ref = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=dt,
                     param_dtype=jnp.float32)
  mine = layers.BatchNorm(dtype=dt)
  v_ref = ref.init(jax.random.key(0), x, use_running_average=True)
  v = mine.init(jax.random.key(0), x, train=False)
  assert (jax.tree.map(lambda a: (a.shape, a.dtype), v)
          == jax.tree.map(lambda a: (a.shape, a.dtype), v_ref))
  params = {'scale': jnp.asarray(1 + r.random(6), jnp.float32),
            'bias': jnp.asarray(r.standard_normal(6), jnp.float32)}
  stats = {'mean': jnp.asarray(r.standard_normal(6), jnp.float32),
           'var': jnp.asarray(0.5 + r.random(6), jnp.float32)}
  act = jax.nn.relu if relu else (lambda y: y)

  def run_ref(p, x, train):
    y, new = ref.apply({'params': p, 'batch_stats': stats}, x,
                       use_running_average=not train,
                       mutable=['batch_stats'])
    return act(y), new

  def run_mine(p, x, train):
    return mine.apply({'params': p, 'batch_stats': stats}, x, train=train,
                      relu=relu, mutable=['batch_stats'])

  tol = 1e-5 if dtype == 'float32' else 2e-2
  cot = jnp.asarray(r.standard_normal(x.shape), dt)
  for train in (True, False):
    outs = []
    for run in (run_ref, run_mine):
      y, vjp, new = jax.vjp(lambda p, x: run(p, x, train), params, x,
                            has_aux=True)
      outs.append((y, new, vjp(cot)))
    assert outs[1][0].dtype == outs[0][0].dtype == dt
    _assert_close(outs[1], outs[0], tol)


def test_batch_norm_gradient_through_statistics():
  """The written-out rule also carries cotangents of the returned mean and
  variance (what differentiating the running statistics would need), and
  matches XLA's autodiff of the same forward there."""
  r = _rng(22)
  x = jnp.asarray(r.standard_normal((2, 4, 5, 3)) * 3 - 1, jnp.float32)
  s = jnp.asarray(1 + r.random(3), jnp.float32)
  b = jnp.asarray(r.standard_normal(3), jnp.float32)
  cots = [jnp.asarray(r.standard_normal(a.shape), jnp.float32)
          for a in (x, s, s)]
  grads = []
  for plain in (False, True):
    ctx = _plain_gradients() if plain else contextlib.nullcontext()
    with ctx:
      f = lambda x, s, b: layers.batch_norm_train(x, s, b, 1e-5, relu=True)
      _, vjp = jax.vjp(f, x, s, b)
      grads.append(vjp(tuple(cots)))
  _assert_close(grads[0], grads[1], 1e-5)


def test_batch_norm_rule_on_cpu_only():
  """CPU programs differentiate batch norm with the written-out rule (two
  reductions over the map in the forward, two in the backward); CUDA and
  TPU keep XLA's autodiff (three in the backward), and so does CPU with the
  custom gradients off, where forward-mode autodiff through ConvBNAct
  works."""
  x = jnp.ones((2, 8, 8, 4))
  s, b = jnp.ones(4), jnp.zeros(4)

  def grad_fn():
    return jax.grad(lambda x, s, b: jnp.sum(layers.batch_norm_train(
        x, s, b, 1e-5, relu=True)[0] ** 2), argnums=(0, 1, 2))

  count = lambda p: len(re.findall(  # reductions of the whole map
      r'stablehlo\.reduce\(.*tensor<2x8x8x4xf32>, tensor<f32>\)',
      _hlo(grad_fn(), x, s, b, platform=p)))
  assert [count(p) for p in ('cpu', 'cuda', 'tpu')] == [4, 5, 5]
  mod = layers.ConvBNAct(4, 3, padding=1)
  v = mod.init(jax.random.key(0), x, train=False)
  apply = lambda v, x: mod.apply(v, x, train=True,
                                 mutable=['batch_stats'])[0]
  with _plain_gradients():
    assert count('cpu') == 5
    assert _jvp_shape(apply, v, x) == (2, 8, 8, 4)


def test_conv_bn_act_relu_without_norm():
  mod = layers.ConvBNAct(2, 1, norm=False)
  x = -jnp.ones((1, 2, 2, 1))
  v = {'params': {'conv': {'kernel': jnp.array([[[[1., -1.]]]]),
                           'bias': jnp.zeros(2)}}}
  y = mod.apply(v, x, train=True)
  np.testing.assert_array_equal(np.asarray(y)[..., 0], 0)
  np.testing.assert_array_equal(np.asarray(y)[..., 1], 1)


# ------------------------------------------------------------------- pooling


POOL_CASES = [
    # (H, W, window, stride, padding, ceil_mode)
    (6, 8, 2, 2, 0, False),
    (7, 9, 2, 2, 0, False),
    (7, 9, 2, 2, 0, True),
    (5, 5, 3, 2, 1, False),
    (6, 7, 3, 2, 1, True),
    (8, 5, (3, 2), (2, 1), 0, True),
    (1, 1, 2, 2, 0, True),  # window larger than the input: ceil_mode only
    (2, 2, 3, 2, 0, True),
    # FRRN's pools of the residual stream (pooled separably, W then H).
    (9, 10, 4, 4, 0, True),
    (12, 20, 8, 8, 0, True),
]


@pytest.mark.parametrize('h,w,k,s,p,ceil', POOL_CASES)
def test_max_pool_with_argmax_matches_torch_reference(h, w, k, s, p, ceil):
  # Small integers make ties common; torch keeps the first maximum.
  x = _rng(4).integers(0, 3, (2, h, w, 3)).astype(np.float32)
  pair = lambda v: (v, v) if isinstance(v, int) else v
  ref_y, ref_i = np_pool_argmax(x, pair(k), pair(s), pair(p), ceil)
  y, idx = layers.max_pool_with_argmax(jnp.asarray(x), k, s, p, ceil)
  assert idx.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(y), ref_y)
  np.testing.assert_array_equal(np.asarray(idx), ref_i)
  np.testing.assert_array_equal(
      np.asarray(layers.max_pool(jnp.asarray(x), k, s, p, ceil)), ref_y)


def test_pool_gradient_goes_to_argmax_only():
  x = jnp.asarray(_rng(5).integers(0, 3, (1, 5, 7, 2)).astype(np.float32))
  g = jnp.asarray(_rng(6).standard_normal((1, 3, 4, 2)).astype(np.float32))
  _, idx = layers.max_pool_with_argmax(x, 2, 2, ceil_mode=True)
  grad = jax.grad(lambda x: jnp.sum(
      layers.max_pool_with_argmax(x, 2, 2, ceil_mode=True)[0] * g))(x)
  ref = np.zeros((1, 35, 2), np.float32)
  for i, j, c in itertools.product(range(3), range(4), range(2)):
    ref[0, int(idx[0, i, j, c]), c] += g[0, i, j, c]
  np.testing.assert_allclose(np.asarray(grad).reshape(1, 35, 2), ref)


@pytest.mark.parametrize('k', [2, 3, 8])
def test_max_pool_with_argmax_nan_wins_like_torch(k):
  # torch's indices (and jnp.argmax) take a window's first NaN in
  # row-major order, and the value is NaN; other windows keep their first
  # maximum.
  x = np.zeros((1, 2 * k, 2 * k, 1), np.float32)
  x[0, 0, 1, 0] = 5  # before the NaNs in row-major order
  x[0, 1, 0, 0] = np.nan  # the window's first NaN
  x[0, k - 1, k - 1, 0] = np.nan
  y, idx = layers.max_pool_with_argmax(jnp.asarray(x), k, k)
  assert np.isnan(np.asarray(y)[0, 0, 0, 0])
  assert int(idx[0, 0, 0, 0]) == 2 * k  # row 1, column 0
  np.testing.assert_array_equal(np.asarray(idx)[0, 1, 1, 0],
                                k * 2 * k + k)  # ties: the first of zeros


def test_max_pool_with_argmax_of_large_windows_stays_small():
  # A 16x16 window is searched along W, then H: 32 views, not 256 and an
  # argmax over a 256-deep stack (104 equations against 264 before; value,
  # gradient and indices of a 2x128x128x8 map compiled in 63 s, now ~1 s).
  x = jnp.zeros((1, 32, 32, 2))
  n_eqns = len(jax.make_jaxpr(
      lambda x: layers.max_pool_with_argmax(x, 16, 16))(x).jaxpr.eqns)
  assert n_eqns < 150, n_eqns


@pytest.mark.parametrize('h,w,k,s,p,ceil', POOL_CASES)
def test_max_pool_gradient_matches_select_and_scatter(h, w, k, s, p, ceil):
  # max_pool has its own VJP (first maximum per window); it must give
  # exactly the gradient of XLA's reduce_window max (select-and-scatter)
  # and of torch's indices, ties included, windows overlapping or not.
  x = jnp.asarray(_rng(8).integers(0, 3, (2, h, w, 3)).astype(np.float32))
  pair = lambda v: (v, v) if isinstance(v, int) else v
  kk, ss = pair(k), pair(s)
  _, _, pp, out, hi = layers._pool_geometry((h, w), k, s, p, ceil)
  g = jnp.asarray(_rng(9).standard_normal((2, *out, 3)).astype(np.float32))
  grad = jax.grad(lambda x: jnp.sum(layers.max_pool(x, k, s, p, ceil) * g))(x)
  ref = jax.grad(lambda x: jnp.sum(nn.max_pool(
      x, kk, ss, padding=((pp[0], hi[0]), (pp[1], hi[1]))) * g))(x)
  # Equal up to the order in which overlapping windows' shares are summed.
  np.testing.assert_allclose(np.asarray(grad), np.asarray(ref), rtol=1e-6,
                             atol=1e-6)
  _, idx = layers.max_pool_with_argmax(x, k, s, p, ceil)
  scat = np.zeros((2, h * w, 3), np.float32)
  for b, i, j, c in itertools.product(range(2), range(out[0]), range(out[1]),
                                      range(3)):
    scat[b, int(idx[b, i, j, c]), c] += g[b, i, j, c]
  np.testing.assert_allclose(np.asarray(grad), scat.reshape(2, h, w, 3),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('ceil', [False, True])
def test_max_pool_tile_rule_equals_views(dtype, ceil):
  # The CPU rule for non-overlapping windows (stored int8 offsets) gives the
  # views' values and gradients exactly: ties (small integers), a tail row
  # and column (7x9), ceil_mode's -inf padding, and NaN windows (no
  # gradient).
  r = _rng(10)
  x = r.integers(0, 3, (2, 7, 9, 3)).astype(np.float32)
  x[0, 0, 1, 0] = x[1, 4, 4, 2] = np.nan
  x = jnp.asarray(x, dtype)
  pool = lambda x: layers.max_pool(x, 2, 2, ceil_mode=ceil)
  g = jnp.asarray(r.standard_normal(jax.eval_shape(pool, x).shape), dtype)
  rule = jax.vjp(pool, x)
  with _plain_gradients():
    views = jax.vjp(pool, x)
  np.testing.assert_array_equal(np.asarray(rule[0], np.float32),
                                np.asarray(views[0], np.float32))
  got, ref = rule[1](g)[0], views[1](g)[0]
  assert got.dtype == ref.dtype
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(ref, np.float32))
  assert np.asarray(got, np.float32)[0, 0:2, 0:2, 0].tolist() == [[0, 0],
                                                                  [0, 0]]


def test_max_pool_tile_rule_second_order_takes_first_maximum():
  # Differentiating the gradient differentiates the rule's forward: a tie's
  # tangent must still go to the window's first maximum (jnp.maximum would
  # split it). Window [[1, 2], [2, 2]]: all of it on the first 2.
  x = jnp.asarray([[1., 2.], [2., 2.]]).reshape(1, 2, 2, 1)
  f = lambda x: jnp.sum(jnp.sin(layers.max_pool(x, 2)))
  h = jax.grad(lambda x: jnp.sum(jax.grad(f)(x) ** 2))
  got = np.asarray(h(x)).ravel()
  with _plain_gradients():
    ref = np.asarray(h(x)).ravel()
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  assert got[0] == 0 and got[1] != 0 and got[2] == got[3] == 0


def test_max_pool_tile_rule_on_cpu_only():
  """CPU programs differentiate 2x2 non-overlapping pools from stored
  offsets (no pads); CUDA and TPU transpose the strided views (one
  interior-padded pad per view), and so does CPU with the custom gradients
  off, where forward-mode autodiff works. Overlapping windows keep the
  views everywhere."""
  x = jnp.ones((2, 8, 8, 4))

  def pads_in_gradient(platform, s=2):
    grad = jax.grad(lambda x: jnp.sum(layers.max_pool(x, 2, s) ** 2))
    return _hlo(grad, x, platform=platform).count('stablehlo.pad')

  assert [pads_in_gradient(p) for p in ('cpu', 'cuda', 'tpu')] == [0, 4, 4]
  assert pads_in_gradient('cpu', s=1) == 4
  with _plain_gradients():
    assert pads_in_gradient('cpu') == 4
    _, t = jax.jvp(lambda x: layers.max_pool(x, 2), (x,), (x,))
    assert t.shape == (2, 4, 4, 4)


def test_max_unpool_scatters_and_differentiates():
  r = _rng(7)
  x = jnp.asarray(r.standard_normal((2, 7, 9, 3)).astype(np.float32))
  y, idx = layers.max_pool_with_argmax(x, 2, 2)
  un = np.asarray(layers.max_unpool(y, idx, (7, 9)))
  ref = np.zeros((2, 63, 3), np.float32)
  yi, ii = np.asarray(y), np.asarray(idx)
  for b, i, j, c in itertools.product(range(2), range(3), range(4), range(3)):
    ref[b, ii[b, i, j, c], c] = yi[b, i, j, c]
  np.testing.assert_array_equal(un, ref.reshape(2, 7, 9, 3))
  # Max positions keep x, all else is zero; the odd last row/col is zero.
  assert (un[:, 6] == 0).all() and (un[:, :, 8] == 0).all()
  assert np.count_nonzero(un) == y.size
  # d/dy of sum(unpool(y) * g) = g gathered at the indices.
  g = jnp.asarray(r.standard_normal((2, 7, 9, 3)).astype(np.float32))
  dy = jax.grad(lambda y: jnp.sum(layers.max_unpool(y, idx, (7, 9)) * g))(y)
  gathered = np.take_along_axis(np.asarray(g).reshape(2, 63, 3),
                                ii.reshape(2, 12, 3), axis=1)
  np.testing.assert_allclose(np.asarray(dy).reshape(2, 12, 3), gathered)


@pytest.mark.parametrize('h,w,k,ceil', [(7, 9, 2, False), (7, 9, 2, True),
                                         (8, 6, 2, False), (9, 10, 3, True),
                                         (5, 5, (2, 1), False)])
def test_max_unpool_windows_equal_the_scatter(h, w, k, ceil):
  # SegNet's and ENet's unpooling (window given): selects by the offset in
  # the window instead of a scatter, same values, gradient and dtype; the
  # rows and columns a floor-mode pool dropped stay zero, the ones a
  # ceil-mode pool padded are cut.
  r = _rng(11)
  x = jnp.asarray(r.standard_normal((2, h, w, 4)).astype(np.float32))
  y, idx = layers.max_pool_with_argmax(x, k, k, ceil_mode=ceil)
  g = jnp.asarray(r.standard_normal((2, h, w, 4)).astype(np.float32))
  f = lambda y, win: jnp.sum(layers.max_unpool(y, idx, (h, w), win) * g)  # noqa: E731
  ref = layers.max_unpool(y, idx, (h, w))
  win = layers.max_unpool(y, idx, (h, w), window=k)
  np.testing.assert_array_equal(np.asarray(win), np.asarray(ref))
  np.testing.assert_array_equal(np.asarray(jax.grad(f)(y, k)),
                                np.asarray(jax.grad(f)(y, None)))
  bf = layers.max_unpool(y.astype(jnp.bfloat16), idx, (h, w), window=k)
  assert bf.dtype == jnp.bfloat16
  # Linear in y, no custom rule: forward mode works too.
  _, t = jax.jvp(lambda y: layers.max_unpool(y, idx, (h, w), window=k),
                 (y,), (jnp.ones_like(y),))
  np.testing.assert_array_equal(np.asarray(t) != 0, np.asarray(ref) != 0)
  # No scatter in the program.
  jaxpr = str(jax.make_jaxpr(
      lambda y: layers.max_unpool(y, idx, (h, w), window=k))(y))
  assert 'scatter' not in jaxpr


def test_max_unpool_shape_mismatch():
  with pytest.raises(ValueError, match='indices'):
    layers.max_unpool(jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 2, 3, 1),
                                                         jnp.int32), (4, 4))


def test_pool_too_small_raises():
  with pytest.raises(ValueError, match='window'):
    layers.max_pool(jnp.zeros((1, 1, 1, 1)), 3, 2)


# -------------------------------------------------------------------- resize


@pytest.mark.parametrize('h,w,oh,ow', [(5, 7, 11, 3), (8, 8, 16, 16),
                                       (9, 4, 9, 4), (6, 10, 4, 23)])
def test_resize_nearest_is_torch_legacy(h, w, oh, ow):
  x = jnp.asarray(_rng(8).standard_normal((2, h, w, 3)).astype(np.float32))
  y = np.asarray(layers.resize(x, (oh, ow), 'nearest'))
  rows, cols = np.arange(oh) * h // oh, np.arange(ow) * w // ow
  np.testing.assert_array_equal(y, np.asarray(x)[:, rows][:, :, cols])


def test_resize_nearest_float32_rounding_like_torch():
  # torch computes floor(dst * float32(in / out)); for 2 -> 82 rows that
  # sends dst 41 to source 0, not floor(41 * 2 / 82) = 1 (checked against
  # torch 2.13's F.interpolate).
  x = jnp.arange(2.)[None, :, None, None]
  y = np.asarray(layers.resize(x, (82, 1), 'nearest'))[0, :, 0, 0]
  assert y[41] == 0 and y[40] == 0 and y[42] == 1
  assert (y[:41] == 0).all() and (y[42:] == 1).all()


def test_resize_nearest_differs_from_jax_image():
  # jax.image.resize uses half-pixel nearest; torch's legacy mode does not.
  x = jnp.arange(5.)[None, :, None, None]
  ours = np.asarray(layers.resize(x, (3, 1), 'nearest')).ravel()
  np.testing.assert_array_equal(ours, [0, 1, 3])
  theirs = np.asarray(jax.image.resize(x, (1, 3, 1, 1), 'nearest')).ravel()
  assert not np.array_equal(ours, theirs)


@pytest.mark.parametrize('align', [False, True])
@pytest.mark.parametrize('h,w,oh,ow', [(4, 5, 9, 13), (9, 12, 4, 5),
                                       (1, 3, 4, 1), (6, 6, 6, 6)])
def test_resize_bilinear(h, w, oh, ow, align):
  x = _rng(9).standard_normal((2, h, w, 3)).astype(np.float32)
  y = np.asarray(layers.resize(jnp.asarray(x), (oh, ow), 'bilinear', align))
  np.testing.assert_allclose(y, np_bilinear(x, oh, ow, align), atol=1e-5)
  if not align:
    ref = jax.image.resize(x, (2, oh, ow, 3), 'bilinear', antialias=False)
    np.testing.assert_allclose(y, np.asarray(ref), atol=1e-5)


@pytest.mark.parametrize('align', [False, True])
def test_resize_bilinear_off_cpu_is_matmuls(align):
  # Off CPU the bilinear blend is a matmul with the interpolation matrix
  # (its gradient a matmul, not the gathers' scatter-add); values as the
  # gathers' (what the CPU runs).
  x = jnp.asarray(_rng(21).standard_normal((2, 5, 7, 3)), jnp.float32)
  for axis, n in ((1, 23), (2, 4)):
    i0, i1, w1 = layers._linear_weights(x.shape[axis], n, align)
    got = layers._lerp_matmul(
        x, axis, layers._lerp_matrix(i0, i1, w1, x.shape[axis]))
    np.testing.assert_allclose(np.asarray(got), np.asarray(
        layers._lerp_axis(x, axis, n, align)), rtol=1e-6, atol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(layers.resize(x, (23, 4), 'bilinear',
                                                  align) ** 2))
  for platform in ('cuda', 'tpu'):
    text = _hlo(grad, x, platform=platform)
    assert 'gather' not in text and 'scatter' not in text, platform
    assert 'dot_general' in text, platform
  assert 'gather' in _hlo(grad, x, platform='cpu')


def test_resize_bf16_and_errors():
  x = jnp.ones((1, 4, 4, 2), jnp.bfloat16)
  assert layers.resize(x, (8, 8)).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="'nearest' or 'bilinear'"):
    layers.resize(x, (8, 8), 'bicubic')
  with pytest.raises(ValueError, match='align_corners'):
    layers.resize(x, (8, 8), 'nearest', align_corners=True)
  with pytest.raises(ValueError, match='positive'):
    layers.resize(x, (0, 8))


def test_crop_and_center_crop():
  x = jnp.arange(2 * 6 * 7 * 1).reshape(2, 6, 7, 1)
  np.testing.assert_array_equal(layers.crop(x, (1, 2), (3, 4)),
                                np.asarray(x)[:, 1:4, 2:6])
  np.testing.assert_array_equal(layers.center_crop(x, (4, 4)),
                                np.asarray(x)[:, 1:5, 1:5])
  with pytest.raises(ValueError, match='does not fit'):
    layers.crop(x, 3, (4, 4))


# ----------------------------------------------- matmul weight-gradient conv


def _conv_loss(conv_fn, padding, dil, stride=(1, 1)):
  def loss(x, w):
    y = conv_fn(x, w, stride, padding, rhs_dilation=dil,
                dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    # A fixed non-uniform cotangent so every tap's gradient differs.
    return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape)))
  return loss


_CONV_CASES = [
    (3, ((1, 1), (1, 1)), (1, 1), (1, 1)),
    (3, ((2, 2), (2, 2)), (2, 2), (1, 1)),
    (3, ((0, 1), (2, 0)), (1, 2), (1, 1)),
    (3, ((-1, 2), (1, -1)), (1, 1), (1, 1)),  # negative padding crops
    (1, ((0, 0), (0, 0)), (1, 1), (1, 1)),
    (7, 'VALID', (1, 1), (1, 1)),
    (3, 'SAME', (1, 1), (1, 1)),
    (3, ((1, 1), (1, 1)), (1, 1), (2, 2)),  # strided: plain lax path
]


@pytest.mark.parametrize('weight_grad,forward,input_grad', [
    ('taps', 'xla', 'taps'), ('strips', 'cols', 'auto')])
@pytest.mark.parametrize('k,padding,dil,stride', _CONV_CASES)
def test_fast_conv_matches_lax_values_and_grads(k, padding, dil, stride,
                                                weight_grad, forward,
                                                input_grad, monkeypatch):
  # 2 output rows' worth of bytes per strip: several strips and a remainder.
  monkeypatch.setattr(cpu_conv, '_STRIP_BYTES', 2 * 9 * 6 * 4 * 2)
  rng = _rng(7)
  x = jnp.asarray(rng.normal(size=(2, 11, 9, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, 5, 6)), jnp.float32)
  ref = _conv_loss(jax.lax.conv_general_dilated, padding, dil, stride)
  fast = _conv_loss(functools.partial(layers.fast_conv_general_dilated,
                                      weight_grad=weight_grad,
                                      forward=forward, input_grad=input_grad),
                    padding, dil, stride)
  np.testing.assert_allclose(fast(x, w), ref(x, w), rtol=1e-5)
  (gx, gw), (rx, rw) = (jax.jit(jax.grad(f, (0, 1)))(x, w)
                        for f in (fast, ref))
  np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5 * np.abs(rx).max())
  np.testing.assert_allclose(gw, rw, rtol=1e-5, atol=1e-5 * np.abs(rw).max())
  hlo = jax.jit(jax.grad(fast, 1)).lower(x, w).as_text()
  if weight_grad == 'taps':
    # The custom VJP is really used on the stride-1 path: its weight
    # gradient is built from dot products, not a backward convolution.
    assert ('convolution' not in hlo) == (stride == (1, 1)), hlo.count('conv')
  else:  # a loop over the full strips, each a forward convolution
    oh, ow = jax.eval_shape(lambda: jax.lax.conv_general_dilated(
        x, w, stride, padding, rhs_dilation=dil,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))).shape[1:3]
    full = oh // cpu_conv.strip_rows(2, ow, 6, 4, oh)
    assert ('while' in hlo) == (stride == (1, 1) and full > 1), (oh, full)


@pytest.mark.parametrize('kh,h_pads,dtype', [
    (3, (1, 1), jnp.float32), (3, (0, 2), jnp.float32),
    (3, (-1, 2), jnp.float32),  # a negative pad crops
    (1, (0, 0), jnp.float32), (5, (2, 2), jnp.float32),
    (3, (1, 1), jnp.bfloat16)])
def test_pairs_match_lax_values_and_grads(kh, h_pads, dtype):
  """The 'pairs' forward (columns in pairs as channels) gives XLA's values
  and gradients, and really convolves the paired view: 2C channels over
  W/2 + 1 columns of the padded input."""
  rng = _rng(17)
  x = jnp.asarray(rng.normal(size=(2, 7, 10, 5)), dtype)
  w = jnp.asarray(rng.normal(size=(kh, 3, 5, 6)), dtype)
  padding = (h_pads, (1, 1))
  ref = _conv_loss(jax.lax.conv_general_dilated, padding, (1, 1))
  fast = _conv_loss(functools.partial(layers.fast_conv_general_dilated,
                                      weight_grad='strips', forward='pairs',
                                      input_grad='xla'), padding, (1, 1))
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  ry, rg = jax.value_and_grad(ref, (0, 1))(x, w)
  fy, fg = jax.value_and_grad(fast, (0, 1))(x, w)
  np.testing.assert_allclose(float(fy), float(ry), rtol=tol)
  for got, want in zip(fg, rg):
    want = np.asarray(want, np.float32)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tol,
                               atol=tol * np.abs(want).max())
  paired = f'[2,{7 + sum(h_pads)},6,10]'
  assert paired in str(jax.make_jaxpr(fast)(x, w)), paired


def test_pairs_reject_what_they_cannot_compute():
  conv = functools.partial(layers.fast_conv_general_dilated,
                           window_strides=(1, 1),
                           dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  x, w = jnp.zeros((1, 4, 5, 2)), jnp.zeros((3, 3, 2, 2))
  with pytest.raises(ValueError, match="'pairs' needs .* even width"):
    conv(x, w, padding='SAME', forward='pairs')
  x = jnp.zeros((1, 4, 6, 2))
  with pytest.raises(ValueError, match="'pairs' needs"):
    conv(x, w, padding='VALID', forward='pairs')
  with pytest.raises(ValueError, match="'pairs' needs"):
    conv(x, w, padding='SAME', forward='pairs', rhs_dilation=(2, 2))
  with pytest.raises(ValueError, match="'pairs' needs"):
    conv(x, jnp.zeros((3, 5, 2, 2)), padding='SAME', forward='pairs')
  assert conv(x, w, padding='SAME', forward='pairs').shape == (1, 4, 6, 2)


def test_fast_conv_rejects_unknown_modes():
  x, w = jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2))
  with pytest.raises(ValueError, match='weight_grad'):
    layers.fast_conv_general_dilated(x, w, (1, 1), 'SAME', weight_grad='fft')
  with pytest.raises(ValueError, match='input_grad'):
    layers.fast_conv_general_dilated(x, w, (1, 1), 'SAME', input_grad='fft')
  with pytest.raises(ValueError, match='forward'):
    layers.fast_conv_general_dilated(x, w, (1, 1), 'SAME', forward='fft')


@pytest.mark.parametrize('x,w,expect', [
    # PSPNet's shape, narrower: few pixels next to the channels.
    ((2, 8, 8, 256), (3, 3, 256, 256), 0),
    # A 7x7 kernel on a 4x4 output (FCN's fc6, narrower).
    ((1, 10, 10, 128), (7, 7, 128, 128), 0),
    # Roomy maps, and convolutions under the 4M multiply-add floor.
    ((2, 32, 32, 32), (3, 3, 32, 32), 1),
    ((2, 4, 4, 16), (3, 3, 16, 16), 1),
])
def test_fast_conv_auto_input_grad_is_auto_convs_rule(x, w, expect):
  """input_grad='auto' of the explicit API decides as auto_conv does on CPU:
  per-tap matmuls (no convolution in the input gradient) exactly when
  cpu_modes picks them."""
  lhs, rhs = jnp.ones(x, jnp.float32), jnp.ones(w, jnp.float32)
  pads = ((1, 1), (1, 1)) if w[0] == 3 else 'VALID'
  modes = cpu_conv.cpu_modes(lhs, rhs, (1, 1), pads,
                             dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  assert (modes is not None and modes[1] == 'taps') == (expect == 0)

  def loss(lhs):
    return jnp.sum(layers.fast_conv_general_dilated(
        lhs, rhs, (1, 1), pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        weight_grad='xla', input_grad='auto'))

  hlo = jax.jit(jax.grad(loss)).lower(lhs).compile().as_text()
  assert hlo.count('convolution(') == expect


def test_strip_rows_fills_the_strip_budget():
  budget = cpu_conv._STRIP_BYTES
  assert cpu_conv.strip_rows(2, 294, 64, 4, 294) == budget // (2 * 294 * 64 * 4)
  assert cpu_conv.strip_rows(1, 10**6, 512, 4, 50) == 1  # at least a row
  assert cpu_conv.strip_rows(1, 8, 8, 4, 12) == 12  # at most the map


def test_large_maps_get_strip_weight_gradients_on_cpu():
  """layers.conv on a map of >= _STRIP_MIN_PIXELS output pixels: the CPU
  program sums the weight gradient over strips (a while loop) and equals
  XLA's; a small map keeps XLA's backward; switching the routes off gives
  plain convolutions, through which forward-mode autodiff works."""
  rng = _rng(13)
  module = layers.conv(64, 3, padding=1)  # 10-row strips at 48x48
  big = None
  for hw, expect_strips in ((48, True), (16, False)):
    x = jnp.asarray(rng.normal(size=(2, hw, hw, 4)), jnp.float32)
    variables = module.init(jax.random.key(0), x)
    cot = jnp.asarray(rng.normal(size=(2, hw, hw, 64)), jnp.float32)

    def loss(v, x, cot=cot):
      return jnp.sum(module.apply(v, x) * cot)

    def ref(w, x, cot=cot):
      return jnp.sum(jax.lax.conv_general_dilated(
          x, w, (1, 1), ((1, 1), (1, 1)),
          dimension_numbers=('NHWC', 'HWIO', 'NHWC')) * cot)

    gv, gx = jax.jit(jax.grad(loss, (0, 1)))(variables, x)
    rw, rx = jax.grad(ref, (0, 1))(variables['params']['kernel'], x)
    np.testing.assert_allclose(gv['params']['kernel'], rw, rtol=1e-5,
                               atol=1e-5 * np.abs(rw).max())
    np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5 * np.abs(rx).max())
    hlo = jax.jit(jax.grad(loss)).lower(variables, x).compile().as_text()
    assert ('while' in hlo) == expect_strips
    big = big or (variables, x)
  variables, x = big
  assert 'custom_vjp' in str(jax.make_jaxpr(module.apply)(variables, x))
  with _plain_gradients():
    assert 'custom_vjp' not in str(jax.make_jaxpr(module.apply)(variables, x))
    assert _jvp_shape(module.apply, variables, x) == (2, 48, 48, 64)


def test_fast_conv_threshold_routes_conv_modules():
  rng = _rng(3)
  # An odd width: auto_conv's own rules leave this conv to XLA ('pairs'
  # needs an even one).
  x = jnp.asarray(rng.normal(size=(1, 8, 9, 4)), jnp.float32)
  module = layers.conv(4, 3, padding=1)
  variables = module.init(jax.random.key(0), x)

  def run():  # jaxpr, output, grads; the threshold is read at trace time
    grads = jax.grad(lambda v: jnp.sum(module.apply(v, x) ** 2))(variables)
    return (str(jax.make_jaxpr(module.apply)(variables, x)),
            module.apply(variables, x), grads)

  plain = run()
  try:
    layers.set_fast_conv_threshold(4)
    fast = run()
    layers.set_fast_conv_threshold(5)  # narrower: auto_conv's own rules
    assert run()[0] == plain[0]
  finally:
    layers.set_fast_conv_threshold(None)
  assert 'custom_vjp' in fast[0] and 'custom_vjp' not in plain[0]
  np.testing.assert_allclose(fast[1], plain[1], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(fast[2]), jax.tree.leaves(plain[2])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
  with pytest.raises(ValueError, match='min_channels'):
    layers.set_fast_conv_threshold(0)


def test_maybe_remat_keeps_names_and_values():
  import flax.linen as nn

  class Block(nn.Module):
    remat: bool

    def _body(self, h, train):
      return layers.ConvBNAct(3, 3, padding=1, name='cbr')(h, train=train)

    @nn.compact
    def __call__(self, h, *, train):
      return layers.maybe_remat(Block._body, self.remat, (2,))(self, h, train)

  x = jnp.asarray(_rng(5).normal(size=(2, 6, 6, 2)), jnp.float32)
  outs = []
  for remat in (False, True):
    m = Block(remat)
    v = m.init(jax.random.key(0), x, train=False)
    y, new = m.apply(v, x, train=True, mutable=['batch_stats'])
    outs.append((jax.tree.structure(v), y, new))
  assert outs[0][0] == outs[1][0]
  np.testing.assert_allclose(outs[1][1], outs[0][1], rtol=1e-6)
  np.testing.assert_allclose(outs[1][2]['batch_stats']['cbr']['bn']['mean'],
                             outs[0][2]['batch_stats']['cbr']['bn']['mean'],
                             rtol=1e-6)


def test_conv_small_output_large_kernel_uses_tap_input_gradient(
    monkeypatch):
  """FCN's fc6 shape (7x7 VALID on a tiny map): the default conv computes
  the input gradient with matmuls (XLA:CPU's conv there is ~15x slower)
  and it equals XLA's; roomy maps keep XLA's convolutions."""
  monkeypatch.setattr(cpu_conv, '_MIN_MACS', 0)  # small widths suffice here
  rng = _rng(11)
  for hw, expect_taps in ((10, True), (40, False)):
    x = jnp.asarray(rng.normal(size=(2, hw, hw, 8)), jnp.float32)
    module = layers.conv(6, 7, padding=0)
    variables = module.init(jax.random.key(0), x)
    cot = jnp.asarray(rng.normal(size=(2, hw - 6, hw - 6, 6)), jnp.float32)

    def loss(v, x, module=module, cot=cot):
      return jnp.sum(module.apply(v, x) * cot)

    ref = jax.grad(lambda w, x, cot=cot: jnp.sum(jax.lax.conv_general_dilated(
        x, w, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
                                             * cot), (0, 1))
    rw, rx = ref(variables['params']['kernel'], x)
    gv, gx = jax.grad(loss, (0, 1))(variables, x)
    np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5 * np.abs(rx).max())
    np.testing.assert_allclose(gv['params']['kernel'], rw, rtol=1e-5,
                               atol=1e-5 * np.abs(rw).max())
    # The input gradient alone: one convolution (XLA's), or none (taps).
    hlo = jax.jit(jax.grad(loss, 1)).lower(variables, x).compile().as_text()
    assert hlo.count('convolution(') == (0 if expect_taps else 1), hlo


@pytest.mark.parametrize('x,w,padding,stride,expect', [
    # FCN conv1_2: a large map -> strip weight gradient.
    ((2, 294, 294, 64), (3, 3, 64, 64), ((1, 1), (1, 1)), 1,
     ('xla', 'xla', 'strips')),
    # FCN fc6: 7x7 VALID on 10x10 -> im2col forward, per-tap input grad.
    ((2, 10, 10, 512), (7, 7, 512, 4096), 'VALID', 1, ('cols', 'taps', 'xla')),
    # PSPNet's 4096 -> 512 on 12x12: few pixels -> per-tap input gradient.
    ((2, 12, 12, 4096), (3, 3, 4096, 512), ((1, 1), (1, 1)), 1,
     ('xla', 'taps', 'xla')),
    # FCN upscore8's phase convolution: the output outgrows the input.
    ((2, 21, 21, 21), (2, 2, 21, 1344), ((1, 1), (1, 1)), 1,
     ('xla', 'xla', 'strips')),
    # Tiny convolutions (< 4M multiply-adds per image) keep XLA's forward
    # and input gradient; large maps get strips whatever their widths.
    ((4, 4, 4, 128), (3, 3, 128, 128), ((1, 1), (1, 1)), 1, None),
    ((2, 48, 48, 4), (3, 3, 4, 8), ((1, 1), (1, 1)), 1,
     ('xla', 'xla', 'strips')),  # under the pairs' 1M floor
    # Columns in pairs from an image (<= 4 channels) to <= 16, at any size;
    # not from 16 channels (attempt 51), not on an odd width, nor where
    # XLA's library already takes it.
    ((8, 96, 96, 3), (3, 3, 3, 16), ((1, 1), (1, 1)), 1,
     ('pairs', 'xla', 'strips')),
    ((2, 256, 256, 4), (3, 3, 4, 16), 'SAME', 1, ('pairs', 'xla', 'strips')),
    ((2, 96, 96, 3), (3, 3, 3, 64), 'SAME', 1, ('xla', 'xla', 'strips')),
    ((2, 96, 96, 16), (3, 3, 16, 16), 'SAME', 1, ('xla', 'xla', 'strips')),
    ((2, 96, 96, 8), (3, 3, 8, 16), 'SAME', 1, ('xla', 'xla', 'strips')),
    ((2, 96, 95, 16), (3, 3, 16, 16), 'SAME', 1, ('xla', 'xla', 'strips')),
    ((2, 96, 96, 32), (3, 3, 32, 16), 'SAME', 1, ('xla', 'xla', 'strips')),
    ((2, 32, 32, 16), (3, 3, 16, 16), 'VALID', 1, None),
    # Mid-sized maps keep XLA's convolutions; strided ones too.
    ((2, 24, 24, 128), (3, 3, 128, 128), ((1, 1), (1, 1)), 1, None),
    ((2, 294, 294, 64), (3, 3, 64, 64), ((1, 1), (1, 1)), 2, None),
])
def test_cpu_modes_follow_the_measured_rules(x, w, padding, stride, expect):
  lhs = jax.ShapeDtypeStruct(x, jnp.float32)
  rhs = jax.ShapeDtypeStruct(w, jnp.float32)
  kw = dict(lhs_dilation=(1, 1), rhs_dilation=(1, 1),
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
            feature_group_count=1, precision=None)
  assert cpu_conv.cpu_modes(lhs, rhs, (stride, stride), padding,
                            **kw) == expect
  with _plain_gradients():
    assert cpu_conv.cpu_modes(lhs, rhs, (stride, stride), padding,
                              **kw) is None


def test_cpu_modes_with_symbolic_shapes():
  """jax.export: a polymorphic batch keeps the forward's rule (the exported
  program computes what the jitted model does); symbolic spatial sizes
  leave the convolution to XLA."""
  rhs = jax.ShapeDtypeStruct((7, 7, 512, 4096), jnp.float32)
  batch = jax.ShapeDtypeStruct(jax.export.symbolic_shape('b, 10, 10, 512'),
                               jnp.float32)
  nhwc = {'dimension_numbers': ('NHWC', 'HWIO', 'NHWC')}
  assert cpu_conv.cpu_modes(batch, rhs, (1, 1), 'VALID', **nhwc) == (
      'cols', 'taps', 'xla')
  spatial = jax.ShapeDtypeStruct(
      jax.export.symbolic_shape('1, h, 10, 512', constraints=('h >= 7',)),
      jnp.float32)
  assert cpu_conv.cpu_modes(spatial, rhs, (1, 1), 'VALID', **nhwc) is None


@pytest.mark.parametrize('stride,padding,hw,dtype', [
    (1, 'VALID', 9, jnp.float32), (1, 'SAME', 8, jnp.float32),
    (2, ((0, 0), (0, 0)), 9, jnp.float32), (2, 'SAME', 8, jnp.float32),
    (1, 'VALID', 6, jnp.bfloat16)])
def test_pointwise_convs_are_matmuls_on_cpu(stride, padding, hw, dtype):
  """1x1 convolutions: on CPU the forward and both gradients are dot products
  (no convolution in the HLO) and equal XLA's convolution; padded ones, and
  all of them with the CPU routes off, stay convolutions."""
  rng = _rng(17)
  x = jnp.asarray(rng.normal(size=(2, hw, hw, 24)), dtype)
  w = jnp.asarray(rng.normal(size=(1, 1, 24, 40)), dtype)
  nhwc = ('NHWC', 'HWIO', 'NHWC')

  def loss(conv):
    def f(x, w):
      y = conv(x, w, (stride, stride), padding, dimension_numbers=nhwc)
      return jnp.sum(y.astype(jnp.float32) * jnp.cos(
          jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape)))
    return f

  assert cpu_conv.pointwise(x, w, (stride, stride), padding, dimension_numbers=nhwc)
  fast, ref = loss(cpu_conv.auto_conv), loss(jax.lax.conv_general_dilated)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  (vf, gf), (vr, gr) = (jax.jit(jax.value_and_grad(f, (0, 1)))(x, w) for f in (fast, ref))
  np.testing.assert_allclose(vf, vr, rtol=tol)
  for a, b in zip(gf, gr):
    assert a.dtype == b.dtype == dtype
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())
  hlo = jax.jit(jax.value_and_grad(fast, (0, 1))).lower(x, w).compile().as_text()
  assert 'convolution(' not in hlo and 'dot(' in hlo
  assert not cpu_conv.pointwise(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=nhwc)
  with _plain_gradients():
    assert not cpu_conv.pointwise(x, w, (stride, stride), padding, dimension_numbers=nhwc)
    hlo = jax.jit(jax.value_and_grad(fast, (0, 1))).lower(x, w).compile().as_text()
    assert 'convolution(' in hlo
