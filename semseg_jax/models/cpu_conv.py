"""Convolution formulations that XLA:CPU runs fast (training on a CPU).

XLA:CPU lowers a convolution's weight gradient as one convolution whose
"kernel" is the whole output gradient and whose output is the ``kh x kw``
kernel, with the input channels as its batch. Its libraries run that form
at a fraction of the forward's speed once the map is large (FCN's conv1_2,
2x294x294x64: forward 83 ms, weight gradient 290 ms, PyTorch's 95 ms), and
its generic kernels take narrow layers (<= 16 channels: U-Net's top) at 4-6x
the forward. :func:`auto_conv`, what ``layers.conv`` uses, keeps XLA's
convolutions except where measurements say XLA:CPU is slow
(experiments/RESULTS.md, "Attempts"):

* 1x1 convolutions (any stride, no padding: :func:`pointwise`) as one matmul
  ``[B, H, W, I] @ [I, O]``, so their gradients are matmuls too; XLA:CPU's
  1x1 weight gradient is a convolution with transposed operands, 3-4x
  slower (2x12x12 2048 -> 512: 12.6 -> 3.9 ms).
* ``'strips'`` weight gradient (maps of at least ``_STRIP_MIN_PIXELS``
  output pixels, or outputs larger than the input): the output rows are
  cut into strips of a few rows, and a ``fori_loop`` sums each strip's
  weight gradient, written out as a forward convolution in the layout
  XLA:CPU's convolution library takes. Each strip
  fits in the core's cache (2.7-3.3x faster for FCN's and U-Net's large
  maps, 3-4x for narrow layers).
* ``'taps'`` input gradient (a large kernel on a small output map, FCN's
  fc6, 7x7 on 4x4, where XLA's is ~15x the forward; or few output pixels
  next to the channels, PSPNet's 4096 -> 512 on 12x12, 2x faster): one
  matmul per tap, no transposed copy of the kernel.
* ``'cols'`` forward for those small outputs: the im2col patches times the
  kernel, one matmul (fc6: 241 -> 65 ms).
* ``'pairs'`` forward for ``kh x 3`` layers from an image (at most
  ``_PAIR_MAX_CHANNELS_IN`` = 4 channels in, 16 out, which XLA:CPU leaves
  to its generic kernel): pairs of columns become channels, so the
  convolution (4/3 the multiply-adds) goes to the library (U-Net's 3 -> 16
  first layer 0.74 -> 0.21 ms). From 16 channels it won on one day and
  lost on another (attempt 51).
* ``'taps'`` weight gradient, opt-in (``set_fast_conv_threshold``).

The ``'cols'`` and ``'taps'`` rules skip convolutions of fewer than
``_MIN_MACS`` (4M) multiply-adds per image: nothing is gained there, and
compile time is.

All of this applies only when the program is lowered for CPU
(``lax.platform_dependent``); GPUs and TPUs run XLA's own convolutions,
except for three rules of :func:`auto_conv` that apply only off CPU, each
where XLA:GPU picked a slow cuDNN kernel: a narrow convolution padded beyond
its kernel's reach (FCN's ``conv1_1``) is computed from im2col patches
(GPU and TPU), whose weight gradient XLA:GPU runs 50x faster; on CUDA, an
atrous convolution's gradients are those of its dense phases (space to
batch, :func:`_conv_phases`), and a 7x7 kernel over wide inputs (FCN's
``fc6``) has the patches' matmul as its forward.
Values are equal up to float summation order (tests). The other
replacements are ``jax.custom_vjp`` rules, so forward-mode differentiation
(``jax.jvp``, ``jax.linearize``) through a routed convolution raises; call
``set_cpu_conv_gradients(False)`` before tracing to get XLA's plain
convolutions everywhere (1x1 ones included).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

_NHWC = ('NHWC', 'HWIO', 'NHWC')
# Process-wide switches, read when a module is traced.
_SETTINGS = {
    # Channel threshold of the opt-in per-tap weight gradient (None: off).
    'min_channels': None,
    # The automatic CPU routes of `auto_conv` ('strips' dW, 'taps' dx).
    'enabled': True,
}
# Output maps with at least this many pixels (48x48 ~ 2304) get the strip
# weight gradient: from 48x48 up it won at every width measured (16-512
# channels); at 37x37 x 512 channels XLA's own was 10% faster.
_STRIP_MIN_PIXELS = 2048
# The small-output and few-pixel rules (im2col forward, per-tap input
# gradient: one matmul per tap) skip convolutions of fewer multiply-adds per
# image: those run in well under a millisecond either way, and each routed
# one adds to the compile time (ENet's 32x32 test step: 21 s routed, 15 s
# plain). The strip rule needs no floor: a strip loop compiles as one
# convolution, and it wins on large maps even at 3 -> 16 channels (U-Net's
# first conv, 2x96x96: 0.94 -> 0.30 ms).
_MIN_MACS = 1 << 22
# Bytes of output gradient per strip: ~256 KiB (a quarter of this CPU's
# 1 MiB L2) was fastest between 96x96 and 294x294 maps.
_STRIP_BYTES = 256 * 1024
# The paired-column forward takes at most this many input channels (an
# image). From 16 channels it won on 12-03 (16 -> 16 on 2x96x96: 0.99 ->
# 0.74 ms) and lost on 12-08 (1.69 -> 1.73 ms; 1.83 -> 2.21 after a fused
# batch norm; U-Net's inference 1.04-1.05x faster without it): attempt 51.
_PAIR_MAX_CHANNELS_IN = 4
# ... and not below this many multiply-adds per image, where either form
# takes microseconds and a routed convolution only adds a custom-VJP
# program to compile (the model tests' tiny networks stay unrouted). U-Net's
# 3 -> 16 first layer at 96x96 has 3.98M.
_PAIR_MIN_MACS = 1 << 20


def set_fast_conv_threshold(min_channels: int | None) -> None:
  """Routes stride-1 convs with ``min(C_in, C_out) >= min_channels`` through
  :func:`fast_conv_general_dilated` with the per-tap weight gradient
  (``None`` turns it off). Takes effect for modules traced afterwards."""
  if min_channels is not None and int(min_channels) < 1:
    raise ValueError(f'min_channels must be >= 1 or None, got {min_channels}')
  _SETTINGS['min_channels'] = (None if min_channels is None
                               else int(min_channels))


def set_cpu_conv_gradients(enabled: bool) -> None:
  """Turns :func:`auto_conv`'s automatic CPU gradient routes on (default) or
  off (XLA's plain convolutions everywhere, forward-mode autodiff works).
  The switch also covers ``layers.conv_transpose``'s custom gradient on
  GPU/TPU, the one other ``custom_vjp`` of the layers' convolutions,
  ``layers.batch_norm_train``'s written-out gradient on CPU and
  ``layers.max_pool``'s stored-offset gradient on CPU.
  Takes effect for modules traced afterwards."""
  _SETTINGS['enabled'] = bool(enabled)


def custom_gradients_enabled() -> bool:
  """Whether the layers' convolutions, batch norm and max pools may use
  custom-VJP gradient rules (:func:`set_cpu_conv_gradients`)."""
  return _SETTINGS['enabled']


def _plain_conv(x, w, pads, dil):
  return jax.lax.conv_general_dilated(
      x, w, (1, 1), pads, rhs_dilation=dil, dimension_numbers=_NHWC)


def _xla_dx(x, w, g, pads, dil):
  _, vjp_x = jax.vjp(lambda x_: _plain_conv(x_, w, pads, dil), x)
  return vjp_x(g)[0]


def _xla_dw(x, w, g, pads, dil):
  _, vjp_w = jax.vjp(lambda w_: _plain_conv(x, w_, pads, dil), w)
  return vjp_w(g)[0]


def _dx_taps(x, w, g, pads, dil):
  """Input gradient as matmuls per tap, scattered back by padding:
  ``dx_pad[:, i + u*dh, j + v*dw] += g[:, i, j] @ w[u, v]^T``. All taps are
  one matmul, ``g [B*H'*W', O]`` times the kernel as ``[kh*kw*I, O]`` (a
  free reshape of HWIO, so no slice or transposed copy of the kernel),
  whose ``[.., kh, kw, I]`` result the shifted sum reads in place."""
  kh, kw, c_in, c_out = w.shape
  b, oh, ow = g.shape[:3]
  hp = x.shape[1] + pads[0][0] + pads[0][1]
  wp = x.shape[2] + pads[1][0] + pads[1][1]
  taps = jax.lax.dot_general(
      g.reshape(b * oh * ow, c_out), w.reshape(kh * kw * c_in, c_out),
      (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  taps = taps.reshape(b, oh, ow, kh, kw, c_in)
  dxp = None
  for u in range(kh):
    for v in range(kw):
      r, c = u * dil[0], v * dil[1]
      tap = jnp.pad(taps[:, :, :, u, v],
                    ((0, 0), (r, hp - r - oh), (c, wp - c - ow), (0, 0)))
      dxp = tap if dxp is None else dxp + tap
  # Back to the input's frame: drop the padding, and give the rows and
  # columns that a negative pad cropped away a zero gradient.
  return _pad_input(dxp, tuple((-lo, -hi) for lo, hi in pads))


def _pad_input(x, pads):
  """Zero padding ``pads`` on H and W; negative pads crop."""
  zero = jnp.zeros((), x.dtype)
  return jax.lax.pad(x, zero, ((0, 0, 0), (*pads[0], 0), (*pads[1], 0),
                               (0, 0, 0)))


def _tap_views(xp, k_hw, dil, out_hw, strides=(1, 1)):
  """The padded input as each kernel tap (u, v) sees it, row-major: the
  ``[B, H', W', C]`` window shifted by ``(u * dh, v * dw)``, every
  ``strides``-th pixel."""
  s = tuple(strides)
  return [jax.lax.slice(
      xp, (0, u * dil[0], v * dil[1], 0),
      (xp.shape[0], u * dil[0] + (out_hw[0] - 1) * s[0] + 1,
       v * dil[1] + (out_hw[1] - 1) * s[1] + 1, xp.shape[3]),
      None if s == (1, 1) else (1, *s, 1))
          for u in range(k_hw[0]) for v in range(k_hw[1])]


def _dw_taps(x, w, g, pads, dil):
  """The weight gradient as one matmul per kernel tap:
  ``dW[u, v] = sum_{b,i,j} x_pad[b, i + u*dh, j + v*dw, :]^T g[b, i, j, :]``."""
  views = _tap_views(_pad_input(x, pads), w.shape[:2], dil, g.shape[1:3])
  taps = [jnp.einsum('bhwi,bhwo->io', view, g,
                     preferred_element_type=jnp.float32) for view in views]
  return jnp.stack(taps).reshape(w.shape)


def _static(n) -> int:
  """``n`` itself, or 1 for a symbolic dimension."""
  return n if isinstance(n, int) else 1


def strip_rows(batch: int, out_w: int, out_c: int, itemsize: int,
               out_h: int) -> int:
  """Rows per strip of :func:`_dw_strips`: about ``_STRIP_BYTES`` of output
  gradient, at least 1 and at most the whole map."""
  per_row = max(1, batch * out_w * out_c * itemsize)
  return max(1, min(out_h, _STRIP_BYTES // per_row))


def _strip_dw(xs, gs, dil):
  """One strip's weight gradient as a forward convolution.

  ``dW[u, v, i, o] = sum_{b,h,w} xs[b, h + dh*u, w + dw*v, i] gs[b, h, w, o]``
  is a VALID convolution of the image ``xs^T`` (``[C_in, rows, W, B]``: the
  input channels as its batch, the batch as its features) with the kernel
  ``gs^T`` (``[rows, W_out, B, C_out]``) at window stride ``dil``: written
  out so, XLA:CPU hands it to its convolution library in the NHWC/HWIO
  layout that library takes, instead of its slow generic kernel.
  """
  lhs = xs.transpose(3, 1, 2, 0)
  rhs = gs.transpose(1, 2, 0, 3)
  return jax.lax.conv_general_dilated(
      lhs, rhs, dil, 'VALID', dimension_numbers=_NHWC,
      preferred_element_type=jnp.float32)  # [C_in, kh, kw, C_out]


def _dw_strips(x, w, g, pads, dil):
  """The weight gradient summed over strips of output rows (a fori_loop over
  the full strips, then the remainder), each strip's a cache-sized forward
  convolution (:func:`_strip_dw`)."""
  xp = _pad_input(x, pads)  # stride 1: oh + halo rows
  b, oh, ow, co = g.shape
  halo = dil[0] * (w.shape[0] - 1)
  rows = strip_rows(_static(b), ow, co, g.dtype.itemsize, oh)
  n, rest = divmod(oh, rows)
  if n == 1 and not rest:
    return _strip_dw(xp, g, dil).transpose(1, 2, 0, 3)

  def body(i, acc):
    xs = jax.lax.dynamic_slice_in_dim(xp, i * rows, rows + halo, 1)
    gs = jax.lax.dynamic_slice_in_dim(g, i * rows, rows, 1)
    return acc + _strip_dw(xs, gs, dil)

  acc = jnp.zeros((x.shape[3], *w.shape[:2], co), jnp.float32)
  acc = jax.lax.fori_loop(0, n, body, acc)
  if rest:
    acc = acc + _strip_dw(xp[:, n * rows:], g[:, n * rows:], dil)
  return acc.transpose(1, 2, 0, 3)


def _fwd_cols(x, w, pads, dil, strides=(1, 1)):
  """The forward as one matmul of the im2col patches ``[B*H'*W', kh*kw*C]``
  with the kernel ``[kh*kw*C, O]``. On CPU for small outputs only, so the
  patches stay small (FCN's fc6, 7x7 VALID on 2x10x10 x 512, is 241 ms as
  XLA:CPU's convolution and 65 ms so); off CPU, under plain autodiff, for
  :func:`_wide_narrow` convolutions, whose weight gradient is then one
  matmul ``patches^T dy``."""
  kh, kw, ci, co = w.shape
  xp = _pad_input(x, pads)
  b = x.shape[0]
  oh, ow = ((xp.shape[1 + i] - dil[i] * (k - 1) - 1) // s + 1
            for i, (k, s) in enumerate(zip((kh, kw), strides)))
  cols = jnp.concatenate(_tap_views(xp, (kh, kw), dil, (oh, ow), strides),
                         axis=-1)
  y = jnp.dot(cols.reshape(b * oh * ow, kh * kw * ci), w.reshape(-1, co),
              preferred_element_type=jnp.float32)
  return y.reshape(b, oh, ow, co).astype(jnp.result_type(x, w))


def _pair_kernel(w):
  """``[kh, 3, C, O]`` -> ``[kh, 2, 2C, 2O]``, the kernel of
  :func:`_fwd_pairs`: block ``m`` of input phase ``p`` (padded column
  ``2(j + m) + p``, i.e. column ``2j + 2m + p - 1``) feeds output column
  ``2j + q`` through tap ``2m + p - q`` (zero where that is not 0..2)."""
  kh, _, c, o = w.shape
  zero = jnp.zeros((kh, c, o), w.dtype)

  def tap(v):
    return w[:, v] if 0 <= v < 3 else zero

  k = jnp.stack([jnp.stack([jnp.stack([tap(2 * m + p - q) for q in range(2)],
                                      2) for p in range(2)], 1)
                 for m in range(2)], 1)  # [kh, m, p, C, q, O]
  return k.reshape(kh, 2, 2 * c, 2 * o)


def _fwd_pairs(x, w, pads, dil):
  """A stride-1 ``kh x 3`` convolution padded ``pads[0]`` in H and 1 in W,
  on pairs of columns: the padded input viewed as ``[B, H, W/2 + 1, 2C]``
  (a free reshape; W even) under a ``kh x 2`` kernel from ``2C`` to ``2O``
  channels (:func:`_pair_kernel`), whose ``[B, H', W/2, 2O]`` output is
  ``[B, H', W, O]`` again. 4/3 the multiply-adds, but twice the channels:
  XLA:CPU hands convolutions of more than 16 channels to its convolution
  library and runs narrower ones in a generic kernel at ~40% of its speed."""
  del dil  # (1, 1)
  b, _, width, c = x.shape
  xp = _pad_input(x, pads)
  xs = xp.reshape(b, xp.shape[1], width // 2 + 1, 2 * c)
  y = jax.lax.conv_general_dilated(xs, _pair_kernel(w), (1, 1), 'VALID',
                                   dimension_numbers=_NHWC)
  return y.reshape(b, y.shape[1], width, w.shape[3])


_FORWARDS = {'xla': _plain_conv, 'cols': _fwd_cols, 'pairs': _fwd_pairs}
_WEIGHT_GRADS = {'xla': _xla_dw, 'taps': _dw_taps, 'strips': _dw_strips}
_INPUT_GRADS = {'xla': _xla_dx, 'taps': _dx_taps}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, pads, dil, modes):
  return _FORWARDS[modes[0]](x, w, pads, dil)


def _conv_fwd(x, w, pads, dil, modes):
  return _FORWARDS[modes[0]](x, w, pads, dil), (x, w)


def _conv_bwd(pads, dil, modes, res, g):
  x, w = res
  dx = _INPUT_GRADS[modes[1]](x, w, g, pads, dil)
  dw = _WEIGHT_GRADS[modes[2]](x, w, g, pads, dil)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _small_output(k_hw, out_hw) -> bool:
  """XLA:CPU's input-gradient convolution is pathological when the output
  map is small next to the kernel (FCN's fc6: 7x7 kernel on a 4x4 output,
  60x slower than the forward); per-tap matmuls cost what the forward does."""
  taps = k_hw[0] * k_hw[1]
  return taps > 1 and out_hw[0] * out_hw[1] <= 4 * taps


def _few_pixels(pixels, c_in, c_out) -> bool:
  """Output pixels (batch included) few next to the channels: XLA:CPU's
  input gradient transposes and flips the whole kernel first, which costs
  more than the convolution itself there (PSPNet's 4096 -> 512 3x3 on
  2x12x12: 194 ms, per-tap matmuls 96 ms). Measured: per-tap wins up to
  ``pixels <= 2 * min(C_in, C_out)`` (2x19x19 at 512 channels: 21 -> 17
  ms), ties at 2x24x24 x 256 and loses beyond."""
  return pixels <= 2 * min(c_in, c_out)


def _explicit_pads(padding, in_hw, k_hw, dil):
  if isinstance(padding, str):
    eff = [(k - 1) * d + 1 for k, d in zip(k_hw, dil)]
    return tuple(jax.lax.padtype_to_pads(in_hw, eff, (1, 1), padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def _plain_nhwc(lhs, rhs, dimension_numbers=None, lhs_dilation=None,
                feature_group_count=1, batch_group_count=1, precision=None,
                preferred_element_type=None, **_):
  """4-D NHWC/HWIO, no input dilation, groups or precision requests: what
  every formulation here assumes."""
  if lhs.ndim != 4:
    return False
  nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  dn = (dimension_numbers if dimension_numbers is None or isinstance(
      dimension_numbers, jax.lax.ConvDimensionNumbers) else
        jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                       dimension_numbers))
  return (dn == nhwc
          and (lhs_dilation is None or tuple(lhs_dilation) == (1, 1))
          and feature_group_count == 1 and batch_group_count == 1
          and precision is None and preferred_element_type is None)


def _routable(lhs, rhs, window_strides, **kwargs):
  """Whether the custom VJP rules cover this call: stride 1 and
  :func:`_plain_nhwc`."""
  return tuple(window_strides) == (1, 1) and _plain_nhwc(lhs, rhs, **kwargs)


def _routed(lhs, rhs, padding, rhs_dilation, modes):
  dil = (1, 1) if rhs_dilation is None else tuple(int(d) for d in rhs_dilation)
  pads = _explicit_pads(padding, lhs.shape[1:3], rhs.shape[:2], dil)
  dtype = jnp.result_type(lhs, rhs)
  return _conv(lhs.astype(dtype), rhs.astype(dtype), pads, dil, modes)


def fast_conv_general_dilated(lhs, rhs, window_strides, padding,
                              lhs_dilation=None, rhs_dilation=None,
                              dimension_numbers=None, feature_group_count=1,
                              batch_group_count=1, precision=None,
                              preferred_element_type=None,
                              weight_grad='taps', input_grad='auto',
                              forward='xla'):
  """Drop-in ``lax.conv_general_dilated`` with chosen formulations.

  Stride-1, undilated-input, ungrouped NHWC/HWIO convolutions go through
  the custom VJP: ``forward`` is ``'xla'`` (XLA's convolution), ``'cols'``
  (one im2col matmul) or ``'pairs'`` (pairs of columns as channels,
  :func:`_fwd_pairs`; ``kh x 3`` kernels padded 1 in W on an even width
  only, else ``ValueError``); ``weight_grad`` is ``'taps'`` (one matmul
  per kernel tap), ``'strips'`` (cache-sized strips of output rows, each a
  forward convolution) or ``'xla'``; ``input_grad`` is ``'taps'``,
  ``'xla'`` or ``'auto'`` (the rule :func:`auto_conv` uses: taps for a
  small output under a large kernel or for few pixels next to the channels,
  else XLA's). Every other call (and ``precision`` /
  ``preferred_element_type`` requests) goes to ``lax.conv_general_dilated``
  unchanged. Output: ``[B, H', W', O]`` in the promoted input dtype.
  """
  kwargs = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                dimension_numbers=dimension_numbers,
                feature_group_count=feature_group_count,
                batch_group_count=batch_group_count, precision=precision,
                preferred_element_type=preferred_element_type)
  for name, value, table in (('forward', forward, _FORWARDS),
                             ('weight_grad', weight_grad, _WEIGHT_GRADS),
                             ('input_grad', input_grad,
                              {**_INPUT_GRADS, 'auto': None})):
    if value not in table:
      raise ValueError(f'{name} must be one of {sorted(table)}, '
                       f'got {value!r}')
  if not _routable(lhs, rhs, window_strides, **kwargs):
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding,
                                        **kwargs)
  if forward == 'pairs' and not _pairs_fit(lhs, rhs, padding, rhs_dilation):
    raise ValueError(
        "forward 'pairs' needs a kh x 3 kernel, no dilation, "
        f'padding 1 in W and an even width; got kernel {rhs.shape}, input '
        f'{lhs.shape}, padding {padding!r}, rhs_dilation {rhs_dilation}')
  if input_grad == 'auto':
    small, few = _matmul_rules(lhs, rhs, padding, rhs_dilation)
    input_grad = 'taps' if small or few else 'xla'
  return _routed(lhs, rhs, padding, rhs_dilation,
                 (forward, input_grad, weight_grad))


def _out_hw(lhs, rhs, padding, rhs_dilation):
  dil = rhs_dilation or (1, 1)
  k_eff = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], dil)]
  pads = _explicit_pads(padding, lhs.shape[1:3], rhs.shape[:2], dil)
  return [lhs.shape[1 + i] + sum(pads[i]) - k_eff[i] + 1 for i in (0, 1)]


def _macs_per_image(out_hw, rhs) -> int:
  """Multiply-adds of one image's convolution: output pixels x kernel."""
  return out_hw[0] * out_hw[1] * math.prod(rhs.shape)


def _matmul_rules(lhs, rhs, padding, rhs_dilation):
  """``(small, few)``: whether the small-output and few-pixel rules (im2col
  forward, per-tap input gradient) apply; neither applies to a convolution
  under ``_MIN_MACS`` multiply-adds per image. Multiply-adds are counted per
  image, and a symbolic batch counts as 1, so that a symbolic batch (export)
  and the jitted model pick the same forward."""
  if not all(isinstance(d, int) for d in (*lhs.shape[1:], *rhs.shape)):
    return False, False  # symbolic sizes (jax.export): XLA's
  out_hw = _out_hw(lhs, rhs, padding, rhs_dilation)
  if _macs_per_image(out_hw, rhs) < _MIN_MACS:
    return False, False
  return (_small_output(rhs.shape[:2], out_hw),
          _few_pixels(_static(lhs.shape[0]) * out_hw[0] * out_hw[1],
                      lhs.shape[-1], rhs.shape[-1]))


def _pairs_fit(lhs, rhs, padding, rhs_dilation) -> bool:
  """Whether :func:`_fwd_pairs` computes this convolution: a ``kh x 3``
  kernel, undilated, padded by 1 in W, on an even width (static sizes)."""
  dil = (1, 1) if rhs_dilation is None else tuple(rhs_dilation)
  h, w = lhs.shape[1:3]
  if (rhs.shape[1] != 3 or dil != (1, 1) or not isinstance(w, int)
      or not isinstance(h, int) or w % 2):
    return False
  return _explicit_pads(padding, (h, w), rhs.shape[:2], dil)[1] == (1, 1)


def _pairs_win(rhs, out_hw) -> bool:
  """Where the paired-column forward beats XLA:CPU's convolution (one core,
  attempts 36 and 51): from an image (at most ``_PAIR_MAX_CHANNELS_IN``
  channels) to at most 16 (3 -> 16 on 2x96x96: 0.74 -> 0.21 ms, 8x96x96
  3.06 -> 0.85), with at least ``_PAIR_MIN_MACS`` multiply-adds per image
  (static sizes)."""
  c_in, c_out = rhs.shape[2:]
  return (c_in <= _PAIR_MAX_CHANNELS_IN and c_out <= 16
          and _macs_per_image(out_hw, rhs) >= _PAIR_MIN_MACS)


def cpu_modes(lhs, rhs, window_strides, padding, **kwargs):
  """``(forward, input_grad, weight_grad)`` that :func:`auto_conv` uses on
  CPU for this call, or ``None`` for XLA's plain convolution."""
  if not _routable(lhs, rhs, window_strides, **kwargs):
    return None
  if not all(isinstance(d, int) for d in (*lhs.shape[1:], *rhs.shape)):
    return None  # symbolic sizes (jax.export): the rules need numbers
  rhs_dilation = kwargs.get('rhs_dilation')
  threshold = _SETTINGS['min_channels']
  if threshold is not None and min(lhs.shape[-1], rhs.shape[-1]) >= threshold:
    small, few = _matmul_rules(lhs, rhs, padding, rhs_dilation)
    return 'xla', 'taps' if small or few else 'xla', 'taps'
  if not _SETTINGS['enabled']:
    return None
  small, few = _matmul_rules(lhs, rhs, padding, rhs_dilation)
  out_hw = _out_hw(lhs, rhs, padding, rhs_dilation)
  # Padding beyond the kernel (the output outgrows the input: the phase
  # convolution of `layers.conv_transpose`) sends XLA's weight gradient to
  # its generic kernel too: FCN's upscore8, 2x2 kernel from 2x21x21 x 21 to
  # 1344 channels, 110 ms; as one strip 3.7 ms.
  grows = out_hw[0] > lhs.shape[1] or out_hw[1] > lhs.shape[2]
  strips = grows or out_hw[0] * out_hw[1] >= _STRIP_MIN_PIXELS
  pairs = (_pairs_fit(lhs, rhs, padding, rhs_dilation)
           and _pairs_win(rhs, out_hw))
  modes = ('cols' if small else 'pairs' if pairs else 'xla',
           'taps' if small or few else 'xla',
           'strips' if strips else 'xla')
  return None if modes == ('xla',) * 3 else modes


def pointwise(lhs, rhs, window_strides, padding, **kwargs) -> bool:
  """Whether :func:`auto_conv` computes this call on CPU as a matmul: a 1x1
  kernel without padding, at any stride (the input is subsampled first),
  and :func:`_plain_nhwc`."""
  del window_strides  # any
  if not _SETTINGS['enabled'] or tuple(rhs.shape[:2]) != (1, 1):
    return False
  if not isinstance(padding, str) and any(
      int(p) != 0 for pair in padding for p in pair):
    return False  # 'VALID' and 'SAME' pad a 1x1 kernel by nothing
  return _plain_nhwc(lhs, rhs, **kwargs)


def _pointwise_conv(x, w, strides):
  """A 1x1 convolution as ``x [B, H, W, I] @ w [I, O]``; its gradients are
  matmuls too (XLA:CPU's weight gradient of a 1x1 convolution is a
  convolution with transposed operands, 3-4x slower: attempt 28)."""
  if tuple(strides) != (1, 1):
    x = x[:, ::strides[0], ::strides[1]]
  dtype = jnp.result_type(x, w)
  return jax.lax.dot_general(x.astype(dtype), w[0, 0].astype(dtype),
                             (((3,), (0,)), ((), ())))


def _wide_narrow(rhs, padding, dil) -> bool:
  """Zero padding beyond the kernel's reach ``d * (k - 1)`` on some side, on
  an input of few channels (``kh * kw * C_in <= 64``): FCN's ``conv1_1``
  (3 channels, 100 pixels around a 3x3 kernel)."""
  if isinstance(padding, str):
    return False
  kh, kw, c_in, _ = rhs.shape
  reach = [d * (k - 1) for d, k in zip(dil, (kh, kw))]
  return kh * kw * c_in <= 64 and any(
      int(v) > r for (lo, hi), r in zip(padding, reach) for v in (lo, hi))


def _dilated_phases(rhs, window_strides, padding, dil) -> bool:
  """A stride-1 atrous convolution (``rhs_dilation`` > 1) whose low padding
  is a multiple of the dilation: DeepLab's and PSPNet's ``padding =
  dilation`` 3x3 convolutions, which :func:`_conv_phases` computes."""
  if (max(dil) == 1 or max(rhs.shape[:2]) == 1
      or tuple(window_strides) != (1, 1) or isinstance(padding, str)):
    return False
  return all(int(lo) >= 0 and int(hi) >= 0 and int(lo) % d == 0
             for (lo, hi), d in zip(padding, dil))


def _conv_phases(x, w, pads, dil):
  """An atrous convolution as a dense one over its ``dh * dw`` phases (space
  to batch): output pixel ``(d*q + r)`` reads only input pixels ``d*(q +
  u) + r - lo``, phase ``r`` of the input, so each phase is a plain
  ``k x k`` convolution with padding ``lo / d`` and the phases interleave
  back, so cuDNN's dense kernels run it and its gradients
  (experiments/RESULTS.md, attempt 41). Needs stride 1 and ``lo % d ==
  0``."""
  b, h, wd, c = x.shape
  kh, kw = w.shape[:2]
  (lo_h, hi_h), (lo_w, hi_w) = pads
  dh, dw = dil
  out_h = h + lo_h + hi_h - dh * (kh - 1)
  out_w = wd + lo_w + hi_w - dw * (kw - 1)
  # Zero rows at the end so that every phase has ceil(H / d) rows.
  eh, ew = -h % dh, -wd % dw
  x = _pad_input(x, ((0, eh), (0, ew)))
  hq, wq = (h + eh) // dh, (wd + ew) // dw
  phases = x.reshape(b, hq, dh, wq, dw, c).transpose(2, 4, 0, 1, 3, 5)
  phases = phases.reshape(dh * dw * b, hq, wq, c)
  # Per phase: as many output rows as the widest phase needs.
  oq_h, oq_w = -(-out_h // dh), -(-out_w // dw)
  ph = ((lo_h // dh, oq_h + kh - 1 - hq - lo_h // dh),
        (lo_w // dw, oq_w + kw - 1 - wq - lo_w // dw))
  y = jax.lax.conv_general_dilated(phases, w, (1, 1), ph,
                                   dimension_numbers=_NHWC)
  co = y.shape[-1]
  y = y.reshape(dh, dw, b, oq_h, oq_w, co).transpose(2, 3, 0, 4, 1, 5)
  return y.reshape(b, oq_h * dh, oq_w * dw, co)[:, :out_h, :out_w]


def _wide_kernel(rhs) -> bool:
  """A large kernel over many channels (at least 7x7 taps and 256 input
  channels: FCN's fc6, 7x7 x 512 -> 4096 on a 16x16 map). Inside XLA:GPU's
  inference program its forward fused with the bias and ReLU ran in a
  generic cuDNN kernel, 21.5 ms of FCN-8s's 27.8 ms at 500x500 batch 8 in
  bfloat16 on an H200 (experiments/RESULTS.md, attempt 43; the same fused
  form of a 3x3 layer took 1.1 ms)."""
  kh, kw, c_in, _ = rhs.shape
  return kh * kw >= 49 and c_in >= 256


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _forward_with_gradient_of(forward, gradient_form, x, w):
  """``forward(x, w)``, differentiated as ``gradient_form`` (the same
  convolution written another way) is: each form where it runs fastest."""
  del gradient_form
  return forward(x, w)


def _forward_with_gradient_of_fwd(forward, gradient_form, x, w):
  del gradient_form
  return forward(x, w), (x, w)


def _forward_with_gradient_of_bwd(forward, gradient_form, res, g):
  del forward
  return jax.vjp(gradient_form, *res)[1](g)


_forward_with_gradient_of.defvjp(_forward_with_gradient_of_fwd,
                                 _forward_with_gradient_of_bwd)


def auto_conv(lhs, rhs, window_strides, padding, **kwargs):
  """What ``layers.conv`` uses: ``lax.conv_general_dilated`` that, when
  lowered for CPU, computes 1x1 convolutions as matmuls (:func:`pointwise`)
  and takes the formulations of :func:`cpu_modes` for the rest (module
  docstring). Values and gradients equal XLA's up to summation order.

  Off CPU, a convolution of a narrow input with zero padding beyond the
  kernel's reach (:func:`_wide_narrow`: FCN's ``conv1_1``, 100 pixels around
  a 3x3 kernel on the RGB input) is computed from im2col patches
  (:func:`_fwd_cols`). XLA:GPU runs its weight gradient as a forward
  convolution whose window is the whole output gradient: 55 ms at FCN-8s's
  500x500 batch 8 in bfloat16 on an H200, against 1.1 ms for the patches'
  matmul (experiments/RESULTS.md, attempt 39).

  On CUDA only (measured on an H200; TPUs keep XLA's forms):

  * an atrous convolution (:func:`_dilated_phases`) keeps XLA's forward
    and is differentiated as its dense phases (:func:`_conv_phases`):
    PSPNet's 3x3 dilation-2 and -4 layers on 8x60x60 x 256 / 512 took 1.4 /
    2.8 ms forward and backward, 0.30 / 0.60 so (PyTorch's 0.67 / 1.11);
    PSPNet's train step, with attempt 42's resizing, 44.5 -> 29.7 ms
    (attempt 41);
  * a 7x7 kernel over at least 256 channels (:func:`_wide_kernel`: FCN's
    ``fc6``) has the patches' matmul as its forward and XLA's gradients:
    in the inference program XLA:GPU ran its forward with the fused bias
    and ReLU in a generic kernel, 21.5 ms; FCN-8s's inference 27.8 -> 7.1
    ms (attempt 43).

  These use :func:`_forward_with_gradient_of`, a custom VJP; with
  ``set_cpu_conv_gradients(False)`` the atrous rule runs the phases in both
  directions and the ``fc6`` rule is off, so forward mode works.
  """
  plain = functools.partial(jax.lax.conv_general_dilated,
                            window_strides=window_strides, padding=padding,
                            **kwargs)
  dil = tuple(kwargs.get('rhs_dilation') or (1, 1))
  nhwc = _plain_nhwc(lhs, rhs, **kwargs)

  def pads():  # not for every call: 'SAME' of symbolic sizes may not resolve
    return _explicit_pads(padding, lhs.shape[1:3], rhs.shape[:2], dil)

  def cols():
    return functools.partial(_fwd_cols, dil=dil,
                             strides=tuple(window_strides), pads=pads())

  default = cols() if nhwc and _wide_narrow(rhs, padding, dil) else plain
  gpu = {}
  custom = custom_gradients_enabled()
  if nhwc and _dilated_phases(rhs, window_strides, padding, dil):
    # XLA's atrous forward, the phases' gradients (forward mode: phases).
    phases = functools.partial(_conv_phases, dil=dil, pads=pads())
    gpu['cuda'] = (functools.partial(_forward_with_gradient_of, plain, phases)
                   if custom else phases)
  elif nhwc and custom and _wide_kernel(rhs):
    # The patches' matmul forward, XLA's gradients.
    gpu['cuda'] = functools.partial(_forward_with_gradient_of, cols(), plain)
  if pointwise(lhs, rhs, window_strides, padding, **kwargs):
    cpu = functools.partial(_pointwise_conv, strides=tuple(window_strides))
  elif (modes := cpu_modes(lhs, rhs, window_strides, padding,
                           **kwargs)) is not None:
    cpu = functools.partial(_routed, padding=padding,
                            rhs_dilation=kwargs.get('rhs_dilation'),
                            modes=modes)
  elif default is plain and not gpu:
    return plain(lhs, rhs)
  else:
    cpu = plain
  return jax.lax.platform_dependent(lhs, rhs, cpu=cpu, default=default, **gpu)
