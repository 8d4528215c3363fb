"""The Caffe-style dilated ResNet blocks of PSPNet and ICNet.

pytorch-semseg's ``residualBlockPSP`` / ``bottleNeckPSP`` /
``bottleNeckIdentifyPSP`` / ``pyramidPooling`` (its ``models/utils.py``),
which follow the authors' Caffe prototxts rather than torchvision:

* a *deep stem*: three 3x3 conv-BN-ReLU (the first with stride 2; 64, 64,
  128 channels in PSPNet) and a 3x3/2 max-pool with padding 1;
* bottleneck blocks whose stride sits on the 3x3 conv; a stage with
  ``dilation > 1`` has stride 1 (upstream's rule) and dilates its 3x3 convs
  (``rhs_dilation``, padding = dilation), which keeps the output stride at 8;
* the pyramid pooling module: average pooling to ``bins`` x ``bins`` maps,
  an optional 1x1 conv-BN-ReLU per bin, bilinear upsampling with
  ``align_corners=True`` and concatenation (PSPNet) or summation (ICNet).

Pooling windows are computed in numpy at trace time and applied as two small
averaging matrices, so every pooling rule is one code path:

* ``'adaptive'``: ``torch.nn.AdaptiveAvgPool2d`` — bin ``i`` of ``b`` over
  ``n`` pixels spans ``[floor(i n / b), ceil((i + 1) n / b))``; any ``n >= 1``
  (bins may overlap or repeat pixels when ``n < b``).
* ``'floor'``: upstream's ``F.avg_pool2d(kernel = stride = int(n / b))``,
  which drops the last ``n mod k`` rows/columns and gives ``n // k`` (not
  always ``b``) outputs; needs ``n >= b``. At upstream's input sizes (PSPNet
  473 / 713: 60 / 90 pixel maps) it equals ``'adaptive'``.
* explicit ``(kernel, stride)`` windows (ICNet's evaluation-time pooling).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from semseg_jax.models import layers

Array = jax.Array
Window = tuple[int, int]  # [start, end) of one pooling window

POOL_MODES = ('adaptive', 'floor')
POOL_NORMS = ('batch', 'group', 'none')
POOL_CONVS = ('apply', 'unused', 'none')


# ----------------------------------------------------------------------------
# Pooling windows.


def adaptive_windows(n: int, bins: int) -> list[Window]:
  """``AdaptiveAvgPool2d``'s windows along one axis of ``n`` pixels."""
  if n < 1 or bins < 1:
    raise ValueError(f'adaptive pooling of {n} pixels into {bins} bins')
  return [(i * n // bins, -(-(i + 1) * n // bins)) for i in range(bins)]


def floor_windows(n: int, bins: int) -> list[Window]:
  """Upstream's ``avg_pool2d(kernel=stride=int(n / bins))`` along one axis."""
  k = n // bins
  if k < 1:
    raise ValueError(
        f"pool_mode='floor' (upstream's kernel = stride = int(n / bins)) "
        f'needs the pooled feature map to be at least {bins} pixels, got '
        f"{n}; use pool_mode='adaptive' or a larger input")
  return [(i * k, i * k + k) for i in range(n // k)]


def strided_windows(n: int, kernel: int, stride: int) -> list[Window]:
  """``avg_pool2d(kernel, stride, padding=0)`` windows along one axis."""
  if n < kernel:
    raise ValueError(f'pooling window {kernel} does not fit in a feature '
                     f'map of {n} pixels')
  return [(i * stride, i * stride + kernel)
          for i in range((n - kernel) // stride + 1)]


def _averaging_matrix(n: int, windows: Sequence[Window]) -> np.ndarray:
  """``[len(windows), n]`` float32 with ``1 / size`` inside each window."""
  m = np.zeros((len(windows), n), np.float32)
  for i, (start, end) in enumerate(windows):
    m[i, start:end] = 1.0 / (end - start)
  return m


def avg_pool_windows(x: Array, rows: Sequence[Window],
                     cols: Sequence[Window]) -> Array:
  """Averages ``x`` ``[B, H, W, C]`` over every (row window, column window).

  Returns ``[B, len(rows), len(cols), C]`` in ``x.dtype``: two averaging
  matrices applied in float32 at full precision (in bfloat16, or with TPU's
  default matmul precision, weights like 1/60 would be rounded).
  """
  ph = jnp.asarray(_averaging_matrix(x.shape[1], rows))
  pw = jnp.asarray(_averaging_matrix(x.shape[2], cols))
  hi = jax.lax.Precision.HIGHEST
  y = jnp.einsum('ih,bhwc->biwc', ph, x.astype(jnp.float32), precision=hi)
  return jnp.einsum('jw,biwc->bijc', pw, y, precision=hi).astype(x.dtype)


def adaptive_avg_pool(x: Array, bins: int | Sequence[int]) -> Array:
  """``F.adaptive_avg_pool2d(x, bins)`` on ``[B, H, W, C]``."""
  bh, bw = (bins, bins) if isinstance(bins, int) else tuple(bins)
  return avg_pool_windows(x, adaptive_windows(x.shape[1], bh),
                          adaptive_windows(x.shape[2], bw))


# ----------------------------------------------------------------------------
# Blocks.


def _cbr(features: int, kernel: int, *, norm: bool, dtype: Any,
         name: str, act=nn.relu, **kw) -> layers.ConvBNAct:
  """Upstream's conv2DBatchNormRelu (``act=relu``) / conv2DBatchNorm
  (``act=None``): the conv has a bias exactly when there is no BatchNorm."""
  return layers.ConvBNAct(features, kernel, use_bias=not norm, norm=norm,
                          act=act, dtype=dtype, name=name, **kw)


class DeepStem(nn.Module):
  """``convbnrelu1_1`` (3x3/2) -> ``1_2`` -> ``1_3`` -> max-pool 3x3/2 pad 1.

  Attributes:
    widths: output channels of the three convs ((64, 64, 128) in PSPNet,
      (32, 32, 64) in ICNet).
    norm: BatchNorm after each conv (else the convs have biases).
    dtype: computation dtype.

  ``[B, H, W, C]`` -> ``[B, ceil(H / 4), ceil(W / 4), widths[2]]``.
  """
  widths: Sequence[int] = (64, 64, 128)
  norm: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    for i, (c, s) in enumerate(zip(self.widths, (2, 1, 1), strict=True)):
      x = _cbr(c, 3, strides=s, padding=1, norm=self.norm, dtype=self.dtype,
               name=f'convbnrelu1_{i + 1}')(x, train=train)
    return layers.max_pool(x, 3, 2, padding=1)


class BottleneckPSP(nn.Module):
  """Bottleneck block: ``cbr1`` 1x1 -> ``cbr2`` 3x3 (stride, dilation) ->
  ``cb3`` 1x1, plus the shortcut, then ReLU.

  With ``project`` (upstream's ``bottleNeckPSP``, first block of a stage) the
  shortcut is ``cb4``, a strided 1x1 conv-BN to ``features``; otherwise
  (``bottleNeckIdentifyPSP``) it is the identity and the block keeps its
  input's channels (``features`` must equal them).

  Attributes:
    mid: width of ``cbr1`` / ``cbr2``.
    features: output channels.
    strides: stride of ``cbr2`` and ``cb4`` (identity blocks: 1).
    dilation: dilation and padding of ``cbr2``.
    project: projection shortcut.
    norm: BatchNorm (else biased convs).
    dtype: computation dtype.
    remat: rematerialise the block in the backward pass (only its input is
      kept).
  """
  mid: int
  features: int
  strides: int = 1
  dilation: int = 1
  project: bool = True
  norm: bool = True
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    return layers.maybe_remat(BottleneckPSP._block, self.remat, (2,))(
        self, x, train)

  def _block(self, x: Array, train: bool) -> Array:
    cbr = functools.partial(_cbr, norm=self.norm, dtype=self.dtype)
    if not self.project and (self.strides != 1 or
                             x.shape[-1] != self.features):
      raise ValueError(f'identity block needs stride 1 and {self.features} '
                       f'input channels, got {self.strides} and '
                       f'{x.shape[-1]}')
    d = self.dilation
    y = cbr(self.mid, 1, name='cbr1')(x, train=train)
    y = cbr(self.mid, 3, strides=self.strides, padding=d, dilation=d,
            name='cbr2')(y, train=train)
    y = cbr(self.features, 1, act=None, name='cb3')(y, train=train)
    if self.project:
      x = cbr(self.features, 1, strides=self.strides, act=None,
              name='cb4')(x, train=train)
    return nn.relu(y + x)


class ResidualStage(nn.Module):
  """Upstream's ``residualBlockPSP``: one projection block then
  ``n_blocks - 1`` identity blocks, named ``layers_{i}`` like upstream's
  ``layers.{i}``.

  Attributes:
    n_blocks: blocks of the whole stage.
    mid: bottleneck width.
    features: output channels.
    strides: stride of the first block; forced to 1 when ``dilation > 1``
      (upstream's rule: dilated stages keep the resolution).
    dilation: dilation of every 3x3 conv of the stage.
    include: ``'all'``, ``'conv'`` (only the projection block) or
      ``'identity'`` (only the identity blocks, numbered from 0) — ICNet
      splits its third stage around a downsampling.
    norm: BatchNorm (else biased convs).
    dtype: computation dtype.
    remat: rematerialise each bottleneck in the backward pass.
  """
  n_blocks: int
  mid: int
  features: int
  strides: int = 1
  dilation: int = 1
  include: str = 'all'
  norm: bool = True
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    if self.include not in ('all', 'conv', 'identity'):
      raise ValueError("include must be 'all', 'conv' or 'identity', got "
                       f'{self.include!r}')
    if self.n_blocks < 1:
      raise ValueError(f'a stage needs at least one block, got '
                       f'{self.n_blocks}')
    strides = 1 if self.dilation > 1 else self.strides
    block = functools.partial(BottleneckPSP, self.mid, self.features,
                              dilation=self.dilation, norm=self.norm,
                              dtype=self.dtype, remat=self.remat)
    i = 0
    if self.include in ('all', 'conv'):
      x = block(strides=strides, project=True, name='layers_0')(x, train=train)
      i = 1
    if self.include in ('all', 'identity'):
      for _ in range(self.n_blocks - 1):
        x = block(project=False, name=f'layers_{i}')(x, train=train)
        i += 1
    return x


def group_norm_groups(channels: int, max_groups: int = 32) -> int:
  """Groups for GroupNorm: 32 (Wu & He's default) when that leaves at least
  two channels per group, else the largest count that divides ``channels``
  and does (1 for a single channel)."""
  g = min(max_groups, max(1, channels // 2))
  while channels % g:
    g -= 1
  return g


def branch_width(channels: int, bins: Sequence[int]) -> int:
  """Channels of each pyramid branch: upstream's ``int(C / len(bins))``."""
  return int(channels / len(bins))


class _PoolBranch(nn.Module):
  """1x1 conv (``conv``) -> norm (``bn`` / ``gn`` / conv bias) -> ReLU."""
  features: int
  norm: str = 'batch'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    x = layers.conv(self.features, 1, use_bias=self.norm == 'none',
                    dtype=self.dtype, name='conv')(x)
    if self.norm == 'batch':  # as layers.ConvBNAct's, ReLU fused
      return layers.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                              name='bn')(x, train=train, relu=True)
    if self.norm == 'group':
      x = nn.GroupNorm(num_groups=group_norm_groups(self.features),
                       epsilon=1e-5, dtype=self.dtype,
                       param_dtype=jnp.float32, name='gn')(x)
    return nn.relu(x)


class PyramidPooling(nn.Module):
  """The pyramid pooling module (Zhao et al., PSPNet, Sec. 3.3).

  For each bin ``b``: average-pool to about ``b x b``, (optionally) a 1x1
  conv-norm-ReLU to ``C // len(bins)`` channels (``path_{i}``, upstream's
  ``path_module_list.{i}``), bilinear resize back with
  ``align_corners=True``; then concatenate ``[x, branches...]`` (``'cat'``:
  ``C + len(bins) * (C // len(bins))`` channels) or add them to ``x``
  (``'sum'``: ``C`` channels, ICNet).

  Attributes:
    bins: pyramid levels, in upstream's order (6, 3, 2, 1).
    fusion: ``'cat'`` or ``'sum'``.
    pool_mode: ``'adaptive'`` or ``'floor'`` (module doc).
    convs: ``'apply'`` (PSPNet), ``'none'`` (ICNet as published: pooled
      maps are summed as they are) or ``'unused'`` (pytorch-semseg's ICNet:
      the convs are created — they are in its state dict and parameter
      count — but never applied).
    norm: the branch norm: ``'batch'`` (upstream), ``'group'`` (GroupNorm,
      no batch statistics: trains with batch 1, where a 1x1 bin gives
      BatchNorm a single value per channel) or ``'none'`` (conv bias).
    dtype: computation dtype.
    remat: rematerialise the module in the backward pass (its full-size
      upsampled branches are the largest activations of PSPNet's head).
  """
  bins: Sequence[int] = (6, 3, 2, 1)
  fusion: str = 'cat'
  pool_mode: str = 'adaptive'
  convs: str = 'apply'
  norm: str = 'batch'
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: Array, *, train: bool,
               windows: Sequence[tuple[tuple[int, int], tuple[int, int]]]
               | None = None) -> Array:
    """``x`` ``[B, H, W, C]`` -> fused features.

    ``windows``, if given, replaces ``pool_mode`` by explicit per-bin
    ``((kernel_h, kernel_w), (stride_h, stride_w))`` average pools.
    """
    for name, value, allowed in (('pool_mode', self.pool_mode, POOL_MODES),
                                 ('pool_norm', self.norm, POOL_NORMS),
                                 ('convs', self.convs, POOL_CONVS),
                                 ('fusion', self.fusion, ('cat', 'sum'))):
      if value not in allowed:
        raise ValueError(f'{name} must be one of {allowed}, got {value!r}')
    if windows is not None:  # hashable, as a static remat argument
      windows = tuple((tuple(k), tuple(s)) for k, s in windows)
    return layers.maybe_remat(PyramidPooling._fuse, self.remat, (2, 3))(
        self, x, train, windows)

  def _fuse(self, x: Array, train: bool, windows) -> Array:
    h, w, c = x.shape[1:]
    width = branch_width(c, self.bins)
    branches = [_PoolBranch(width, self.norm, self.dtype, name=f'path_{i}')
                for i in range(len(self.bins))]
    if self.convs == 'unused' and self.is_initializing():
      # Create the parameters only (upstream never applies these convs).
      for branch in branches:
        branch(jnp.zeros((1, 1, 1, c), self.dtype), train=False)
    outs = [x]
    for i, b in enumerate(self.bins):
      if windows is not None:
        (kh, kw), (sh, sw) = windows[i]
        rows, cols = strided_windows(h, kh, sh), strided_windows(w, kw, sw)
      elif self.pool_mode == 'floor':
        rows, cols = floor_windows(h, b), floor_windows(w, b)
      else:
        rows, cols = adaptive_windows(h, b), adaptive_windows(w, b)
      y = avg_pool_windows(x, rows, cols)
      if self.convs == 'apply':
        y = branches[i](y, train=train)
      outs.append(layers.resize(y, (h, w), 'bilinear', align_corners=True))
    if self.fusion == 'cat':
      return jnp.concatenate(outs, axis=-1)
    return functools.reduce(lambda a, b: a + b, outs)


__all__ = ['BottleneckPSP', 'DeepStem', 'PyramidPooling', 'ResidualStage',
           'adaptive_avg_pool', 'adaptive_windows', 'avg_pool_windows',
           'branch_width', 'floor_windows', 'group_norm_groups',
           'strided_windows', 'POOL_CONVS', 'POOL_MODES', 'POOL_NORMS']
