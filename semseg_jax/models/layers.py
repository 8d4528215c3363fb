"""Shared building blocks with PyTorch semantics, reused by every network.

All tensors are NHWC. Sizes, paddings and index rules follow PyTorch exactly
(``Conv2d``, ``ConvTranspose2d``, ``MaxPool2d(ceil_mode, return_indices)``,
``MaxUnpool2d``, ``F.interpolate``) so that weights converted from
pytorch-semseg reproduce its outputs. Index arithmetic that depends only on
static shapes is done in numpy at trace time; only gathers/scatters reach XLA.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from semseg_jax.models import cpu_conv

Array = jax.Array
Dtype = Any
IntOrPair = int | Sequence[int]
# PyTorch-style padding: an int, an (h, w) pair, explicit ((lo, hi), (lo, hi))
# pairs, or one of Flax's strings 'SAME' / 'VALID'.
Padding = int | str | Sequence[int] | Sequence[tuple[int, int]]


def _pair(v: IntOrPair, name: str) -> tuple[int, int]:
  """Returns ``(v, v)`` for an int, ``tuple(v)`` for a length-2 sequence."""
  if isinstance(v, (int, np.integer)):
    return int(v), int(v)
  v = tuple(int(a) for a in v)
  if len(v) != 2:
    raise ValueError(f'{name} must be an int or a pair, got {v!r}')
  return v


def _conv_padding(padding: Padding) -> str | tuple[tuple[int, int], ...]:
  """Converts PyTorch-style padding to ``nn.Conv``'s explicit pairs."""
  if isinstance(padding, str):
    return padding.upper()
  if isinstance(padding, (int, np.integer)):
    p = int(padding)
    return ((p, p), (p, p))
  padding = tuple(padding)
  if len(padding) == 2 and all(
      isinstance(p, (int, np.integer)) for p in padding):
    return tuple((int(p), int(p)) for p in padding)
  if len(padding) == 2 and all(len(p) == 2 for p in padding):
    return tuple((int(lo), int(hi)) for lo, hi in padding)
  raise ValueError(f'padding must be an int, a pair, two (lo, hi) pairs or '
                   f'"SAME"/"VALID", got {padding!r}')


# ----------------------------------------------------------------------------
# Bilinear upsampling filter (FCN's get_upsampling_weight).


def bilinear_kernel(kernel_size: int, in_channels: int,
                    out_channels: int) -> np.ndarray:
  """The FCN bilinear upsampling filter, as a ``ConvTranspose`` kernel.

  Args:
    kernel_size: spatial size ``k`` of the square filter.
    in_channels: input channels of the transposed convolution.
    out_channels: output channels.

  Returns:
    float32 array ``[k, k, in_channels, out_channels]``: the separable
    triangle filter ``(1 - |i - c| / f) * (1 - |j - c| / f)`` (``f =
    ceil(k / 2)``, ``c`` the filter centre) at ``[:, :, i, i]`` for
    ``i < min(in, out)`` and zero elsewhere, so each channel is upsampled on
    its own. This is torch's ``[in, out, k, k]`` filter in our HWIO layout.
  """
  factor = (kernel_size + 1) // 2
  center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
  og = np.arange(kernel_size, dtype=np.float64)
  tri = 1.0 - np.abs(og - center) / factor
  filt = np.outer(tri, tri)
  weight = np.zeros((kernel_size, kernel_size, in_channels, out_channels),
                    np.float32)
  for i in range(min(in_channels, out_channels)):
    weight[:, :, i, i] = filt
  return weight


def bilinear_init() -> Callable[..., Array]:
  """A Flax initializer filling a ``[k, k, in, out]`` kernel with
  :func:`bilinear_kernel` (deterministic: the rng key is unused)."""

  def init(key, shape, dtype=jnp.float32):
    del key
    kh, kw, cin, cout = shape
    if kh != kw:
      raise ValueError(f'bilinear_init needs a square kernel, got {shape}')
    return jnp.asarray(bilinear_kernel(kh, cin, cout), dtype)

  return init


# ----------------------------------------------------------------------------
# Activation rematerialisation.


def maybe_remat(method: Callable[..., Any], enabled: bool,
                static_argnums: tuple[int, ...] = ()) -> Callable[..., Any]:
  """``method`` itself, or ``nn.remat(method)`` when ``enabled``.

  ``method`` is an unbound module method ``f(module, *args)`` called from the
  module's compact ``__call__`` as ``maybe_remat(type(self).f, ...)(self,
  ...)``: its submodules and parameters keep the names they have without
  remat (checkpoints stay compatible), and under ``jax.grad`` only its
  inputs are kept for the backward pass, the rest is recomputed.
  ``static_argnums`` counts the module as 0 and must list every non-array
  argument (``train`` flags, widths): traced bools would break BatchNorm.
  """
  if not enabled:
    return method
  return nn.remat(method, static_argnums=static_argnums)


# ----------------------------------------------------------------------------
# Convolution gradients for XLA:CPU live in cpu_conv.py; these names stay
# here for existing callers.

fast_conv_general_dilated = cpu_conv.fast_conv_general_dilated
set_fast_conv_threshold = cpu_conv.set_fast_conv_threshold
set_cpu_conv_gradients = cpu_conv.set_cpu_conv_gradients


# ----------------------------------------------------------------------------
# Convolutions.


def conv(features: int,
         kernel_size: IntOrPair,
         strides: IntOrPair = 1,
         padding: Padding = 0,
         dilation: IntOrPair = 1,
         use_bias: bool = True,
         dtype: Dtype = jnp.float32,
         name: str | None = None,
         **kwargs: Any) -> nn.Conv:
  """``nn.Conv`` configured like ``torch.nn.Conv2d``.

  ``padding`` is PyTorch's (symmetric zero padding of ``p`` pixels) unless
  it is a string or explicit pairs. ``dilation`` becomes ``kernel_dilation``,
  which XLA lowers to ``rhs_dilation`` (atrous convolution): output size is
  ``floor((H + 2p - d * (k - 1) - 1) / s) + 1`` as in PyTorch.
  Parameters stay float32; ``dtype`` is the computation dtype. Gradients go
  through :func:`cpu_conv.auto_conv` (on CPU: 1x1 convolutions as matmuls,
  strip-wise weight gradients and per-tap input gradients where XLA:CPU's
  backward convolutions are slow; same parameters and values).
  """
  fast = ({} if 'conv_general_dilated' in kwargs else
          {'conv_general_dilated': cpu_conv.auto_conv})
  return nn.Conv(
      features=features,
      kernel_size=_pair(kernel_size, 'kernel_size'),
      strides=_pair(strides, 'strides'),
      padding=_conv_padding(padding),
      kernel_dilation=_pair(dilation, 'dilation'),
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=jnp.float32,
      name=name,
      **fast,
      **kwargs)


def _conv_transpose_lhs_dilated(x, kernel, s, p, op, d):
  pads = [(d[i] * (kernel.shape[i] - 1) - p[i],
           d[i] * (kernel.shape[i] - 1) - p[i] + op[i]) for i in range(2)]
  return jax.lax.conv_general_dilated(
      x, jnp.flip(kernel, (0, 1)), window_strides=(1, 1), padding=pads,
      lhs_dilation=s, rhs_dilation=d,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _strided_conv(z, kernel_t, s, p):
  """The strided convolution (``O -> C`` channels, kernel ``[kh, kw, O, C]``)
  whose input gradient is the transposed convolution."""
  return jax.lax.conv_general_dilated(
      z, kernel_t, window_strides=s, padding=[(p[0], p[0]), (p[1], p[1])],
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_transpose_native(x, kernel, s, p, op):
  """The dilated-input form with PyTorch's (cuDNN's) gradients.

  The transposed convolution is the input gradient of
  :func:`_strided_conv`, so its input gradient is that strided convolution
  of ``dy`` and its kernel gradient is that convolution's weight gradient
  with ``dy`` as the input and ``x`` as the output gradient: a
  backward-filter convolution that XLA:GPU hands to cuDNN. JAX's own rule
  for the kernel of an ``lhs_dilation`` convolution is a convolution over the
  zero-inserted input (``s_h * s_w`` times the pixels) with the whole output
  gradient as its window, which XLA:GPU runs as a forward convolution with
  a window the size of the image (experiments/RESULTS.md, attempt 38).
  Needs ``output_padding < stride`` (so that the strided convolution of the
  output has the input's size) and no kernel dilation.
  """
  return _conv_transpose_lhs_dilated(x, kernel, s, p, op, (1, 1))


def _conv_transpose_native_fwd(x, kernel, s, p, op):
  return _conv_transpose_native(x, kernel, s, p, op), (x, kernel)


def _conv_transpose_native_bwd(s, p, op, res, g):
  del op  # the strided convolution of g has x's size (op < s)
  x, kernel = res
  dx, vjp_kernel = jax.vjp(lambda kt: _strided_conv(g, kt, s, p),
                           jnp.swapaxes(kernel, 2, 3))
  return dx, jnp.swapaxes(vjp_kernel(x)[0], 2, 3)


_conv_transpose_native.defvjp(_conv_transpose_native_fwd,
                              _conv_transpose_native_bwd)


def _conv_transpose_phases(x, kernel, s, p, op):
  """The same transposed convolution as ``s_h * s_w`` output phases.

  Output row ``o = s*q + r - p`` of the uncropped result receives
  ``x[q - j] * kernel[r + s*j]`` for ``j < J = ceil(k / s)``: one stride-1
  ``J x J`` convolution from ``C`` to ``s_h * s_w * O`` channels computes
  every phase, and depth-to-space interleaves them. No zeros are inserted,
  so it does ``s_h * s_w`` times fewer multiply-adds than the dilated-input
  form (a 2x2 stride-2 kernel becomes one matmul).
  """
  b, h, w, c = x.shape
  k, o = kernel.shape[:2], kernel.shape[3]
  jh, jw = (-(-k[i] // s[i]) for i in range(2))
  kp = jnp.pad(kernel, ((0, jh * s[0] - k[0]), (0, jw * s[1] - k[1]),
                        (0, 0), (0, 0)))
  kp = jnp.flip(kp.reshape(jh, s[0], jw, s[1], c, o), (0, 2))
  kp = kp.transpose(0, 2, 4, 1, 3, 5).reshape(jh, jw, c, s[0] * s[1] * o)
  # cpu_conv's formulations (this form runs on CPU only): XLA:CPU's own
  # weight gradient of this padded convolution is 30x slower.
  z = cpu_conv.auto_conv(
      x, kp, (1, 1), [(jh - 1, jh - 1), (jw - 1, jw - 1)],
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  hq, wq = h + jh - 1, w + jw - 1
  z = z.reshape(b, hq, wq, s[0], s[1], o).transpose(0, 1, 3, 2, 4, 5)
  z = z.reshape(b, hq * s[0], wq * s[1], o)
  out = [(n - 1) * s[i] - 2 * p[i] + k[i] + op[i]
         for i, n in enumerate((h, w))]
  # output_padding may reach past the uncropped result: zeros there.
  short = [max(0, p[i] + out[i] - z.shape[1 + i]) for i in range(2)]
  if any(short):
    z = jnp.pad(z, ((0, 0), (0, short[0]), (0, short[1]), (0, 0)))
  return z[:, p[0]:p[0] + out[0], p[1]:p[1] + out[1]]


def conv_transpose(x: Array, kernel: Array, strides: Sequence[int],
                   padding: Sequence[int], output_padding: Sequence[int],
                   dilation: Sequence[int] = (1, 1)) -> Array:
  """``F.conv_transpose2d`` (groups 1, no bias) on NHWC, kernel
  ``[kh, kw, in, out]`` (torch's weight transposed by ``(2, 3, 0, 1)``).

  A dilated-input convolution (``lhs_dilation=strides``, flipped kernel,
  padding ``d * (k - 1) - p``), which XLA's GPU and TPU backends run as a
  native transposed convolution, with the gradients PyTorch takes
  (:func:`_conv_transpose_native`: the kernel gradient as cuDNN's backward
  filter of the strided convolution, not JAX's convolution over the
  zero-inserted input). XLA:CPU has no fast path for input dilation (its
  backward was 10x the phase form's for U-Net's 2x2 up-convolutions, and
  FCN's 16x16 stride-8 forward 28x), so on CPU, chosen when the program is
  lowered (``lax.platform_dependent``), the same values come from
  :func:`_conv_transpose_phases` (equal up to float summation order; tests).
  ``layers.set_cpu_conv_gradients(False)`` turns the custom gradient off
  (plain JAX autodiff, forward mode included) on every backend.
  """
  s, p, op, d = (tuple(int(v) for v in t) for t in
                 (strides, padding, output_padding, dilation))
  dilated = functools.partial(_conv_transpose_lhs_dilated, s=s, p=p, op=op,
                              d=d)
  if d != (1, 1) or s == (1, 1):
    return dilated(x, kernel)
  phases = functools.partial(_conv_transpose_phases, s=s, p=p, op=op)
  default = dilated
  if cpu_conv.custom_gradients_enabled() and all(
      o < st for o, st in zip(op, s)):
    default = lambda x, k: _conv_transpose_native(x, k, s, p, op)  # noqa: E731
  return jax.lax.platform_dependent(x, kernel, cpu=phases, default=default)


class ConvTranspose(nn.Module):
  """``torch.nn.ConvTranspose2d`` semantics (groups=1).

  The kernel is ``[kh, kw, in, out]``: torch's weight ``[in, out, kh, kw]``
  transposed by ``(2, 3, 0, 1)``, not flipped. The output size is
  ``(H - 1) * s - 2p + d * (k - 1) + output_padding + 1``.

  Implemented by :func:`conv_transpose`: a dilated-input convolution
  (``lhs_dilation=strides``) with the spatially flipped kernel and padding
  ``d * (k - 1) - p`` (plus ``output_padding`` at the bottom/right; negative
  padding crops), computed phase by phase on XLA:CPU.

  Attributes:
    features: output channels.
    kernel_size: ``k`` or ``(kh, kw)``.
    strides: ``s`` or ``(sh, sw)``.
    padding: torch ``padding`` ``p`` (int or pair).
    output_padding: torch ``output_padding`` (int or pair), ``< s`` or ``< d``.
    kernel_dilation: torch ``dilation``.
    use_bias: whether to add a bias.
    kernel_init / bias_init: initializers (params are float32).
    dtype: computation dtype.
  """
  features: int
  kernel_size: IntOrPair
  strides: IntOrPair = 1
  padding: IntOrPair = 0
  output_padding: IntOrPair = 0
  kernel_dilation: IntOrPair = 1
  use_bias: bool = True
  kernel_init: Callable[..., Array] = nn.initializers.lecun_normal()
  bias_init: Callable[..., Array] = nn.initializers.zeros
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """``x`` ``[B, H, W, C_in]`` -> ``[B, H', W', features]``."""
    k = _pair(self.kernel_size, 'kernel_size')
    s = _pair(self.strides, 'strides')
    p = _pair(self.padding, 'padding')
    op = _pair(self.output_padding, 'output_padding')
    d = _pair(self.kernel_dilation, 'kernel_dilation')
    for i in range(2):
      if op[i] >= max(s[i], d[i]):
        raise ValueError(f'output_padding {op} must be smaller than stride '
                         f'{s} or dilation {d}')
    kernel = self.param('kernel', self.kernel_init,
                        (k[0], k[1], x.shape[-1], self.features), jnp.float32)
    y = conv_transpose(x.astype(self.dtype), kernel.astype(self.dtype), s, p,
                       op, d)
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


# ----------------------------------------------------------------------------
# Batch normalisation (training: batch statistics; + ReLU) with its gradient
# written out for XLA:CPU.


def _bn_normalize(x, mean, inv, scale, bias, relu):
  """``(x - mean) * scale * inv + bias`` (and ReLU) in float32, as flax's
  BatchNorm normalises, with ``inv = rsqrt(var + eps)``."""
  y = (x.astype(jnp.float32) - mean) * (scale * inv) + bias
  return jax.nn.relu(y) if relu else y


def _bn_forward(x, scale, bias, epsilon, relu):
  """Training-mode batch norm over all but the last axis, float32 statistics
  as ``flax.linen.BatchNorm`` computes them (``use_fast_variance``):
  ``((y, mean, var), inv)``."""
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axes)
  var = jnp.maximum(0., jnp.mean(xf * xf, axes) - mean * mean)
  inv = jax.lax.rsqrt(var + epsilon)
  return (_bn_normalize(xf, mean, inv, scale, bias, relu), mean, var), inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _bn_train_vjp(x, scale, bias, epsilon, relu):
  return _bn_forward(x, scale, bias, epsilon, relu)[0]


def _bn_train_fwd(x, scale, bias, epsilon, relu):
  out, inv = _bn_forward(x, scale, bias, epsilon, relu)
  return out, (x, out[1], inv, scale, bias)


def _bn_train_bwd(epsilon, relu, res, cts):
  """Two reductions (the sums of ``g`` and ``g * (x - mean)``) and one
  element-wise pass; XLA's autodiff of the forward reduces the map three
  times."""
  del epsilon
  x, mean, inv, scale, bias = res
  gy, gmean, gvar = cts
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  xc = x.astype(jnp.float32) - mean
  a = scale * inv
  g = gy.astype(jnp.float32)
  if relu:  # the forward's pre-activation, recomputed in the same fusion
    g = jnp.where(xc * a + bias > 0., g, 0.)
  sg = jnp.sum(g, axes)
  sgx = jnp.sum(g * xc, axes)
  # d/dx of (x - mean) * scale * rsqrt(var + eps) + bias, plus the paths
  # through the returned mean and var (zero unless something differentiates
  # the running statistics).
  k = (2. * gvar - a * inv * inv * sgx) / n
  dx = a * g + (gmean - a * sg) / n + xc * k
  return dx.astype(x.dtype), sgx * inv, sg


_bn_train_vjp.defvjp(_bn_train_fwd, _bn_train_bwd)


def batch_norm_train(x: Array, scale: Array, bias: Array, epsilon: float,
                     relu: bool = False) -> tuple[Array, Array, Array]:
  """Batch norm with the batch's statistics (and ReLU when ``relu``):
  ``(y, mean, var)``, ``y`` float32, ``mean``/``var`` the biased float32
  statistics over all axes but the last (channels).

  On CPU (``lax.platform_dependent``), with the custom gradients of
  :func:`cpu_conv.set_cpu_conv_gradients` on, the gradient is written out
  (:func:`_bn_train_bwd`): forward and backward together 1.1-1.4x faster
  than XLA's autodiff of flax's BatchNorm + ReLU on most of U-Net's and
  SegNet's layers on one core, level or slightly slower on some maps of
  12x12 and below (experiments/RESULTS.md, attempt 44). Elsewhere, and
  with them off (forward-mode autodiff), XLA differentiates the same
  forward.
  """
  epsilon, relu = float(epsilon), bool(relu)
  plain = lambda x, s, b: _bn_forward(x, s, b, epsilon, relu)[0]
  if not cpu_conv.custom_gradients_enabled():
    return plain(x, scale, bias)
  written = lambda x, s, b: _bn_train_vjp(x, s, b, epsilon, relu)
  return jax.lax.platform_dependent(x, scale, bias, cpu=written,
                                    default=plain)


class BatchNorm(nn.Module):
  """``flax.linen.BatchNorm`` over the last axis (the same variables:
  params ``scale``/``bias``, batch_stats ``mean``/``var``; the same
  momentum rule and fast variance), optionally followed by a fused ReLU,
  with :func:`batch_norm_train`'s gradient in training.

  Attributes:
    momentum: running-statistics decay (flax's convention, torch's 0.1 is
      0.9 here).
    epsilon: added to the variance.
    dtype: output dtype (statistics and normalisation in float32).
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool, relu: bool = False) -> Array:
    c = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean',
                            lambda s: jnp.zeros(s, jnp.float32), (c,))
    ra_var = self.variable('batch_stats', 'var',
                           lambda s: jnp.ones(s, jnp.float32), (c,))
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    if train:
      y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, relu)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean
        ra_var.value = m * ra_var.value + (1 - m) * var
    else:
      y = _bn_normalize(x, ra_mean.value,
                        jax.lax.rsqrt(ra_var.value + self.epsilon), scale,
                        bias, relu)
    return y.astype(self.dtype)


class ConvBNAct(nn.Module):
  """Conv2d -> optional BatchNorm2d -> optional activation (PyTorch defaults).

  Submodules are named ``conv`` and ``bn`` (the converter relies on it).
  BatchNorm (:class:`BatchNorm`: flax's variables and numbers, a ReLU
  activation fused into it) uses ``momentum=0.9`` (torch's 0.1),
  ``epsilon=1e-5`` and keeps its running statistics in ``batch_stats``.

  Attributes:
    features: output channels.
    kernel_size, strides, dilation, padding: as :func:`conv` (PyTorch style).
    use_bias: conv bias (pytorch-semseg keeps it even before BN).
    norm: apply BatchNorm.
    act: activation or ``None``.
    dtype: computation dtype; params and BN statistics stay float32.
  """
  features: int
  kernel_size: IntOrPair = 3
  strides: IntOrPair = 1
  dilation: IntOrPair = 1
  padding: Padding = 0
  use_bias: bool = True
  norm: bool = True
  act: Callable[[Array], Array] | None = nn.relu
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    x = conv(self.features, self.kernel_size, self.strides, self.padding,
             self.dilation, self.use_bias, self.dtype, name='conv')(x)
    act = self.act
    if self.norm:
      relu = act is nn.relu
      x = BatchNorm(momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                    name='bn')(x, train=train, relu=relu)
      act = None if relu else act
    if act is not None:
      x = act(x)
    return x


# ----------------------------------------------------------------------------
# Pooling.


def _pool_out_size(n: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
  """PyTorch's pooling output length (``pooling_output_shape``)."""
  if 2 * p > k:
    raise ValueError(f'pad {p} should be at most half of the window {k}')
  # Python's // floors negative numerators like ATen's div_rtn.
  out = (n + 2 * p - k + (s - 1 if ceil_mode else 0)) // s + 1
  # The last window must start inside the input or its left padding.
  if ceil_mode and (out - 1) * s >= n + p:
    out -= 1
  if out < 1:
    raise ValueError(f'pooling window {k} (stride {s}, padding {p}) leaves '
                     f'no output for an input of size {n}')
  return out


def _pool_geometry(hw, window, stride, padding, ceil_mode):
  k, s, p = (_pair(window, 'window'), _pair(stride, 'stride'),
             _pair(padding, 'padding'))
  out = tuple(_pool_out_size(hw[i], k[i], s[i], p[i], ceil_mode)
              for i in range(2))
  # Padding at the end so that every window lies inside the padded array.
  hi = tuple(max(0, (out[i] - 1) * s[i] + k[i] - hw[i] - p[i])
             for i in range(2))
  return k, s, p, out, hi


def _window_views(x: Array, k, s, out) -> list[Array]:
  """One strided ``[B, h, w, C]`` view per window offset, row-major."""
  return [
      jax.lax.slice(x, (0, dy, dx, 0),
                    (x.shape[0], dy + (out[0] - 1) * s[0] + 1,
                     dx + (out[1] - 1) * s[1] + 1, x.shape[3]),
                    (1, s[0], s[1], 1))
      for dy in range(k[0]) for dx in range(k[1])
  ]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _max_of_views(x: Array, k, s, out) -> Array:
  views = _window_views(x, k, s, out)
  y = views[0]
  for v in views[1:]:
    y = jnp.maximum(y, v)
  return y


def _first_max(views: list[Array], y: Array) -> Array:
  """The index (int8 up to 127 views) of each window's first view equal to its maximum ``y``
  (row-major: the element XLA's select-and-scatter and torch pick), or
  ``len(views)`` where none is (a NaN maximum). Built from scalars only:
  an array made with ``jnp.full`` gets a ``reshard`` under a mesh context,
  which jax2onnx cannot lower."""
  n = len(views)
  dt = jnp.int8 if n < 127 else jnp.int32
  arg = jnp.where(views[-1] == y, dt(n - 1), dt(n))
  for i in reversed(range(n - 1)):
    arg = jnp.where(views[i] == y, dt(i), arg)
  return arg


@_max_of_views.defjvp
def _max_of_views_jvp(k, s, out, primals, tangents):
  # The tangent of each window's first maximum (_first_max). It is linear
  # in the tangent through strided slices and selects, so its transpose,
  # the gradient, is interior-padded pads and adds that XLA fuses.
  (x,), (tx,) = primals, tangents
  y = _max_of_views(x, k, s, out)
  arg = _first_max(_window_views(x, k, s, out), y)
  ty = None
  for i, tv in enumerate(_window_views(tx, k, s, out)):
    part = jnp.where(arg == i, tv, jnp.zeros((), tv.dtype))
    ty = part if ty is None else ty + part
  return y, ty


def _tile_max_fwd(x: Array, k) -> tuple[Array, Array]:
  """Maxima of the ``k`` tiles of ``x`` (``[B, h * k[0], w * k[1], C]``)
  and the offset ``u * k[1] + v`` of each tile's first maximum
  (:func:`_first_max`; a NaN maximum gets no gradient, as with
  :func:`_max_of_views`)."""
  out = (x.shape[1] // k[0], x.shape[2] // k[1])
  # The views' own maximum, so that differentiating this forward (second
  # order) also sends a tie's tangent to its first maximum.
  y = _max_of_views(x, k, k, out)
  return y, _first_max(_window_views(x, k, k, out), y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _tile_max(x: Array, k) -> Array:
  return _tile_max_fwd(x, k)[0]


def _tile_max_bwd(k, arg, g):
  """The cotangent to each tile's first maximum: one element-wise pass in
  the input's shape that reads the stored offsets. Differentiating
  :func:`_max_of_views` instead recomputes the window's comparisons for
  every interior-padded view and adds ``k[0] * k[1]`` pads, which XLA:CPU
  fuses into the producer's recomputation (U-Net's 2x96x96x16 pool with
  its batch-norm backward: 1.7 ms against 0.4)."""
  b, h, w, c = g.shape
  pos = np.arange(k[0] * k[1], dtype=np.int8).reshape(1, 1, k[0], 1, k[1],
                                                       1)
  dx = jnp.where(arg[:, :, None, :, None, :] == pos,
                 g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
  return (dx.reshape(b, h * k[0], w * k[1], c),)


_tile_max.defvjp(_tile_max_fwd, _tile_max_bwd)


def max_pool(x: Array, window: IntOrPair = 2, stride: IntOrPair | None = None,
             padding: IntOrPair = 0, ceil_mode: bool = False) -> Array:
  """``torch.nn.MaxPool2d`` on ``[B, H, W, C]`` (pads with ``-inf``).

  The maximum over the window's strided views, with a custom gradient to
  the first maximum of each window (XLA's and torch's rule). Same values
  and gradients as ``reduce_window`` max and its select-and-scatter
  gradient, which XLA:CPU runs ~10x slower (2x2 pool of 2x294x294x64:
  170 ms -> 17 ms). On CPU, with :func:`cpu_conv.set_cpu_conv_gradients`
  on, non-overlapping windows of at most 4 elements (stride = window)
  store each window's int8 offset of its maximum and differentiate from it
  (:func:`_tile_max_bwd`; experiments/RESULTS.md, attempt 50). Elsewhere,
  and with them off (forward-mode autodiff), the views' JVP everywhere.

  Windows larger than 2x2 are pooled separably, along W and then along H
  (``kh + kw`` views instead of ``kh * kw``: FRRN's 16x16 pools compile in
  seconds, not minutes). The H pass takes the first row holding the window's
  maximum and the W pass the first column of that row: the first maximum in
  row-major order again, so values and gradients are unchanged.
  """
  stride = window if stride is None else stride
  k, s, p, out, hi = _pool_geometry(x.shape[1:3], window, stride, padding,
                                    ceil_mode)
  if any(p) or any(hi):
    x = jnp.pad(x, ((0, 0), (p[0], hi[0]), (p[1], hi[1]), (0, 0)),
                constant_values=jnp.array(-jnp.inf, x.dtype))
  return _pool_padded(x, k, s, out)[0]


def _pool_padded(xp: Array, k, s, out) -> tuple[Array, Array | None]:
  """Window maxima of the padded ``xp``: directly for up to 2x2 windows
  (``(y, None)``), else along W and then along H (``(y, rows' maxima)``)."""
  if k[0] * k[1] <= 4:
    views = lambda x: _max_of_views(x, k, s, out)
    if (k != s or not jnp.issubdtype(xp.dtype, jnp.floating)
        or not cpu_conv.custom_gradients_enabled()):
      return views(xp), None
    # Non-overlapping windows on CPU: the gradient from stored offsets
    # (_tile_max_bwd); the same values and gradients. A tail that fills no
    # window is sliced off (its gradient is zero).
    tiles = lambda x: _tile_max(x[:, :out[0] * k[0], :out[1] * k[1]], k)
    return jax.lax.platform_dependent(xp, cpu=tiles, default=views), None
  xw = _max_of_views(xp, (1, k[1]), (1, s[1]), (xp.shape[1], out[1]))
  return _max_of_views(xw, (k[0], 1), (s[0], 1), out), xw


def max_pool_with_argmax(x: Array, window: IntOrPair = 2,
                         stride: IntOrPair | None = None,
                         padding: IntOrPair = 0,
                         ceil_mode: bool = False) -> tuple[Array, Array]:
  """``MaxPool2d(return_indices=True)``.

  Args:
    x: ``[B, H, W, C]`` float.
    window, stride, padding, ceil_mode: as in PyTorch (stride defaults to
      the window).

  Returns:
    ``(y, indices)``: ``y`` ``[B, h, w, C]`` the window maxima, ``indices``
    int32 ``[B, h, w, C]`` the flat position ``row * W + col`` of each
    maximum in the unpadded ``H x W`` plane, as torch returns it. Ties go to
    the first element in row-major window order (torch's rule); NaN wins.
    Gradients flow to the selected element only. Windows larger than 2x2
    are searched separably, like :func:`max_pool`'s values.
  """
  stride = window if stride is None else stride
  h_in, w_in = x.shape[1:3]
  k, s, p, out, hi = _pool_geometry((h_in, w_in), window, stride, padding,
                                    ceil_mode)
  neg = jnp.array(-jnp.inf, x.dtype)
  xp = jnp.pad(x, ((0, 0), (p[0], hi[0]), (p[1], hi[1]), (0, 0)),
               constant_values=neg)
  # Values and gradient as max_pool's.
  y, rows_max = _pool_padded(xp, k, s, out)
  # The window offset (dy, dx) of each first maximum, from argmaxes over
  # window views (jnp.argmax: the first maximum, or the first NaN).
  xs = jax.lax.stop_gradient(xp)
  first = lambda views: jnp.argmax(jnp.stack(views), axis=0).astype(jnp.int32)
  if rows_max is None:
    arg = first(_window_views(xs, k, s, out))
    dy, dx = arg // k[1], arg % k[1]
  else:
    # Separably, as the values (k0 + k1 views, not k0 * k1: FRRN's 16x16
    # windows): the first column holding each row's maximum, then the first
    # row holding the window's maximum, and that row's column; the first
    # maximum (or NaN) in row-major order again.
    col = first(_window_views(xs, (1, k[1]), (1, s[1]),
                              (xs.shape[1], out[1])))
    hk, hs = (k[0], 1), (s[0], 1)
    dy = first(_window_views(jax.lax.stop_gradient(rows_max), hk, hs, out))
    dx = jnp.zeros_like(dy)
    for r, c in enumerate(_window_views(col, hk, hs, out)):
      dx = jnp.where(dy == r, c, dx)
  # Flat position row * W + col in the unpadded plane.
  top = (jnp.arange(out[0], dtype=jnp.int32) * s[0] - p[0])[:, None, None]
  left = (jnp.arange(out[1], dtype=jnp.int32) * s[1] - p[1])[None, :, None]
  return y, (top + dy) * w_in + left + dx


def max_unpool(y: Array, indices: Array, output_hw: Sequence[int],
               window: IntOrPair | None = None) -> Array:
  """``MaxUnpool2d``: scatters ``y`` to ``indices`` in a zero ``output_hw``.

  Args:
    y: ``[B, h, w, C]`` pooled values.
    indices: int ``[B, h, w, C]`` flat positions from
      :func:`max_pool_with_argmax`.
    output_hw: ``(H, W)`` of the unpooled map (torch's ``output_size``).
    window: the window of the pooling that made ``indices`` when it was
      non-overlapping and unpadded (``max_pool_with_argmax(x, k, k)``, as
      SegNet's and ENet's): each index then lies in its own ``k x k`` window,
      and the unpooling is ``k * k`` selects by the index's offset in the
      window, interleaved, with an elementwise gradient. ``None``: a general
      scatter (XLA's scatter, and a gather as its gradient). SegNet's last
      unpooling (8x180x240x64 -> 360x480, bfloat16) forward and backward on
      an H200: 0.85 ms as a scatter, 0.26 ms as selects (PyTorch's 1.52);
      on one CPU core (1x180x240x64) 68 ms against 12. With ``window``, an
      index outside its window is dropped.

  Returns:
    ``[B, H, W, C]`` with ``y`` at its argmax positions and zeros elsewhere;
    differentiable in ``y``. Out-of-range indices are dropped (torch raises;
    traced indices cannot be checked).
  """
  if y.shape != indices.shape:
    raise ValueError(f'max_unpool: values {y.shape} and indices '
                     f'{indices.shape} differ in shape')
  b, h, w, c = y.shape
  hh, ww = (int(v) for v in output_hw)
  if window is not None:
    return _unpool_windows(y, indices, (hh, ww), _pair(window, 'window'))
  flat_y = y.reshape(b, h * w, c)
  flat_i = indices.reshape(b, h * w, c)
  bi = jnp.arange(b)[:, None, None]
  ci = jnp.arange(c)[None, None, :]
  out = jnp.zeros((b, hh * ww, c), y.dtype)
  out = out.at[bi, flat_i, ci].set(flat_y, mode='drop')
  return out.reshape(b, hh, ww, c)


def _unpool_windows(y: Array, indices: Array, output_hw: tuple[int, int],
                    k: tuple[int, int]) -> Array:
  """:func:`max_unpool` of indices from a ``k``-window, ``k``-stride pool."""
  b, h, w, c = y.shape
  hh, ww = output_hw
  row = indices // ww
  dy = row - (np.arange(h, dtype=np.int32) * k[0])[:, None, None]
  dx = indices - row * ww - (np.arange(w, dtype=np.int32) * k[1])[None, :,
                                                                    None]
  zero = jnp.zeros((), y.dtype)
  # [B, h, k0, w, k1, C]: window (i, j)'s element (u, v) is y where the
  # index points at it.
  planes = jnp.stack([
      jnp.stack([jnp.where((dy == u) & (dx == v), y, zero)
                 for v in range(k[1])], axis=3)
      for u in range(k[0])], axis=2)
  out = planes.reshape(b, h * k[0], w * k[1], c)[:, :hh, :ww]
  return jnp.pad(out, ((0, 0), (0, hh - out.shape[1]),
                       (0, ww - out.shape[2]), (0, 0)))


# ----------------------------------------------------------------------------
# Resizing (F.interpolate) and cropping.


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
  """Source rows of torch's legacy 'nearest': ``floor(dst * in / out)``,
  computed in float32 exactly as ATen's ``nearest_idx`` does."""
  if n_out == n_in:
    return np.arange(n_out)
  if n_out == 2 * n_in:
    return np.arange(n_out) >> 1
  scale = np.float32(n_in) / np.float32(n_out)
  src = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(src, n_in - 1)


def _linear_weights(n_in: int, n_out: int, align_corners: bool):
  """``(i0, i1, w1)`` of torch's bilinear: ``out = x[i0]*(1-w1) + x[i1]*w1``,
  with the source coordinate computed in float32 like ATen."""
  dst = np.arange(n_out, dtype=np.float32)
  if align_corners:
    scale = (np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1
             else np.float32(0))
    src = dst * scale
  else:
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5),
                     np.float32(0))
  i0 = np.floor(src).astype(np.int64)
  i0 = np.minimum(i0, n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  w1 = (src - i0.astype(np.float32)).astype(np.float32)
  return i0, i1, w1


def _lerp_axis(x: Array, axis: int, n_out: int, align_corners: bool) -> Array:
  n_in = x.shape[axis]
  if n_in == n_out:  # identity in every torch mode
    return x
  i0, i1, w1 = _linear_weights(n_in, n_out, align_corners)

  def gathers(x):
    shape = [1] * x.ndim
    shape[axis] = n_out
    w = jnp.asarray(w1, jnp.float32).reshape(shape)
    a = jnp.take(x, jnp.asarray(i0), axis=axis).astype(jnp.float32)
    b = jnp.take(x, jnp.asarray(i1), axis=axis).astype(jnp.float32)
    return (a * (1.0 - w) + b * w).astype(x.dtype)

  # Off CPU: a matmul with the [n_out, n_in] interpolation matrix, whose
  # gradient is a matmul too. The gathers' gradient is a scatter-add, which
  # XLA:GPU runs with atomics (PSPNet's upsamplings at 473x473 batch 8:
  # ~3.3 ms of scatters per train step on an H200; experiments/RESULTS.md,
  # attempt 42). Gathers everywhere when the matrix would be large.
  if n_in * n_out > _LERP_MATRIX_MAX:
    return gathers(x)
  return jax.lax.platform_dependent(
      x, cpu=gathers,
      default=lambda x: _lerp_matmul(x, axis, _lerp_matrix(i0, i1, w1,
                                                           n_in)))


# Largest interpolation matrix (entries) that _lerp_axis uses off CPU: 16 MiB.
_LERP_MATRIX_MAX = 1 << 22


def _lerp_matrix(i0, i1, w1, n_in) -> np.ndarray:
  """``[n_out, n_in]`` float32: row ``o`` blends ``x[i0[o]]`` and
  ``x[i1[o]]`` as :func:`_lerp_axis`'s gathers do."""
  m = np.zeros((len(i0), n_in), np.float32)
  rows = np.arange(len(i0))
  m[rows, i0] += np.float32(1) - w1
  m[rows, i1] += w1
  return m


def _lerp_matmul(x: Array, axis: int, m: np.ndarray) -> Array:
  """``x`` with ``axis`` replaced by ``m @ x`` along it, in float32."""
  y = jnp.tensordot(jnp.asarray(m), x.astype(jnp.float32), ((1,), (axis,)),
                    precision=jax.lax.Precision.HIGHEST)
  return jnp.moveaxis(y, 0, axis).astype(x.dtype)


def resize(x: Array, hw: Sequence[int], method: str = 'bilinear',
           align_corners: bool = False) -> Array:
  """``F.interpolate(size=hw)`` on ``[B, H, W, C]``.

  Args:
    x: ``[B, H, W, C]``.
    hw: output ``(H', W')``.
    method: ``'nearest'`` — PyTorch's legacy nearest (``F.upsample``
      default): ``src = floor(dst * H / H')``, which differs from
      ``jax.image.resize``'s half-pixel nearest; ``'bilinear'`` — half-pixel
      centres without antialiasing (``align_corners=False``, equal to
      ``jax.image.resize(..., 'bilinear', antialias=False)``) or corner
      aligned (``align_corners=True``, ``nn.UpsamplingBilinear2d``).
    align_corners: only for ``'bilinear'``.

  Returns:
    ``[B, H', W', C]`` in ``x.dtype`` (bilinear blends in float32: on CPU
    from two gathers per axis, elsewhere as a float32 matmul with the
    interpolation matrix, whose gradient needs no scatter).
  """
  hh, ww = (int(v) for v in hw)
  if hh < 1 or ww < 1:
    raise ValueError(f'resize: output size must be positive, got {hw!r}')
  if method == 'nearest':
    if align_corners:
      raise ValueError("resize: align_corners applies to 'bilinear' only")
    x = jnp.take(x, jnp.asarray(_nearest_index(x.shape[1], hh)), axis=1)
    return jnp.take(x, jnp.asarray(_nearest_index(x.shape[2], ww)), axis=2)
  if method == 'bilinear':
    x = _lerp_axis(x, 1, hh, align_corners)
    return _lerp_axis(x, 2, ww, align_corners)
  raise ValueError(f"resize: method must be 'nearest' or 'bilinear', "
                   f'got {method!r}')


def crop(x: Array, offset: IntOrPair, hw: Sequence[int]) -> Array:
  """``x[:, oy:oy+h, ox:ox+w]`` with a clear error when it does not fit."""
  oy, ox = _pair(offset, 'offset')
  h, w = (int(v) for v in hw)
  if oy < 0 or ox < 0 or oy + h > x.shape[1] or ox + w > x.shape[2]:
    raise ValueError(f'crop of {h}x{w} at offset ({oy}, {ox}) does not fit '
                     f'in a {x.shape[1]}x{x.shape[2]} map')
  return x[:, oy:oy + h, ox:ox + w]


def center_crop(x: Array, hw: Sequence[int]) -> Array:
  """Crops the centre ``hw`` of ``[B, H, W, C]`` (extra pixel at the end)."""
  h, w = (int(v) for v in hw)
  return crop(x, ((x.shape[1] - h) // 2, (x.shape[2] - w) // 2), (h, w))
