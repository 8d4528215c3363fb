"""ResNet-18/34/50/101/152 trunks in torchvision's layout, for segmentation heads.

API (stable: LinkNet, RefineNet and DeepLabV3+ build on it)::

    ResNet(depth, output_stride=32, width_mult=1.0, dtype=jnp.float32,
           multi_grid=None)
    ResNet(...)(x, *, train) -> dict[str, jax.Array]
    feature_channels(depth, width_mult=1.0) -> dict[str, int]
    feature_strides(output_stride=32) -> dict[str, int]
    STAGES = ('conv1', 'stem', 'layer1', 'layer2', 'layer3', 'layer4')

``x`` is ``[B, H, W, C]`` (any ``C``; torchvision's ImageNet weights expect
3 channels normalised with the ImageNet mean/std, which our pipeline does).
The returned dict holds, with ``w = width_mult`` and ``e`` the block
expansion (1 for depth 18/34, 4 for 50/101/152):

=========  ====================================  ======  =============
key        what                                  stride  channels
=========  ====================================  ======  =============
'conv1'    conv1 (7x7/2) -> bn1 -> ReLU          2       64w
'stem'     then the 3x3/2 max-pool (layer1 in)   4       64w
'layer1'   stage 1                               4       64w * e
'layer2'   stage 2                               8       128w * e
'layer3'   stage 3                               16      256w * e
'layer4'   stage 4                               32      512w * e
=========  ====================================  ======  =============

Each stride-2 step maps a size ``n`` to ``ceil(n / 2)`` (as in torch), so
``H=W=224`` gives 112, 56, 56, 28, 14, 7. ``output_stride`` 16 (8) keeps
``layer4`` (``layer3`` and ``layer4``) at the previous resolution and
dilates their 3x3 convolutions instead, exactly like torchvision's
``replace_stride_with_dilation``: the 3x3 conv that would have had the stride
(in the first block of a dilated stage) keeps the *previous* stage's
dilation, every later 3x3 conv gets the new one; e.g. output_stride 8 gives
layer3 rates 1 then 2, and layer4 2 then 4. torchvision refuses dilation in
``BasicBlock``; ResNet-18/34 here dilate like timm's ResNet (the first
block's second conv already has the new rate), which is exact a-trous: the
dilated ``layer4`` subsampled by its extra stride equals the plain one, for
every depth. ``feature_strides(output_stride)`` gives the strides.

``multi_grid`` (DeepLabV3, Chen et al. 2017, Sec. 3.2) multiplies the
dilation of each ``layer4`` block by ``multi_grid[j]``, including the first
block, whose base dilation is then layer4's own (e.g. output_stride 16 and
``(1, 2, 4)`` give rates 2, 4, 8, the paper's setting). ``None`` keeps
torchvision's rule above.

Blocks follow torchvision (``BasicBlock``; ``Bottleneck`` v1.5 with the stride
on the 3x3 conv): conv without bias -> BatchNorm (torch momentum 0.1, eps
1e-5; statistics in ``batch_stats``) -> ReLU, the shortcut a 1x1 strided conv
+ BatchNorm when the shape changes; a 3x3 conv's padding equals its dilation.

Parameters are named after torchvision's state dict: ``conv1``, ``bn1``,
``layer{i}_{j}`` (torch ``layer{i}.{j}``) holding ``conv1``, ``bn1``,
``conv2``, ``bn2`` (``conv3``, ``bn3``) and ``downsample_conv`` /
``downsample_bn`` (torch ``downsample.0`` / ``.1``); see
``semseg_jax.convert.resnet``. There is no ``fc`` classifier, so at width 1
the parameter counts are torchvision's minus its fc layer (512e * 1000 +
1000): ResNet-18 11,176,512 (11,689,512 - 513,000), ResNet-34 21,284,672,
ResNet-50 23,508,032 (25,557,032 - 2,049,000), ResNet-101 42,500,160,
ResNet-152 58,143,808. Convolutions are initialised like torchvision
(Kaiming normal, fan-out, ReLU gain), BatchNorm scale 1 and bias 0.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from semseg_jax.models import layers
from semseg_jax.models.backbones.vgg import scaled_width

STAGES = ('conv1', 'stem', 'layer1', 'layer2', 'layer3', 'layer4')

# depth -> (bottleneck?, blocks per stage).
_ARCHS = {
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
}
_PLANES = (64, 128, 256, 512)
_OUTPUT_STRIDES = (8, 16, 32)

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu'), untruncated.
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _check_depth(depth: int) -> tuple[bool, tuple[int, ...]]:
  if depth not in _ARCHS:
    raise ValueError(f'ResNet depth must be one of {sorted(_ARCHS)}, '
                     f'got {depth!r}')
  return _ARCHS[depth]


def _check_output_stride(output_stride: int) -> None:
  if output_stride not in _OUTPUT_STRIDES:
    raise ValueError(f'ResNet output_stride must be one of {_OUTPUT_STRIDES}, '
                     f'got {output_stride!r}')


def feature_channels(depth: int, width_mult: float = 1.0) -> dict[str, int]:
  """Channels of each returned feature map (keys of :data:`STAGES`)."""
  bottleneck, _ = _check_depth(depth)
  expansion = 4 if bottleneck else 1
  stem = scaled_width(64, width_mult)
  out = {'conv1': stem, 'stem': stem}
  for i, planes in enumerate(_PLANES, start=1):
    out[f'layer{i}'] = scaled_width(planes, width_mult) * expansion
  return out


def feature_strides(output_stride: int = 32) -> dict[str, int]:
  """Nominal stride of each returned feature map w.r.t. the input."""
  _check_output_stride(output_stride)
  return {'conv1': 2, 'stem': 4, 'layer1': 4, 'layer2': 8,
          'layer3': min(16, output_stride), 'layer4': output_stride}


def _conv(features, kernel, strides, padding, dilation, dtype, name):
  return layers.conv(features, kernel, strides, padding, dilation,
                     use_bias=False, dtype=dtype, kernel_init=_conv_init,
                     name=name)


def _bn(train: bool, dtype, name: str) -> nn.BatchNorm:
  # torch BatchNorm2d defaults: momentum 0.1 (= Flax 0.9), eps 1e-5.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32,
                      name=name)


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN (ReLU between) plus shortcut, then ReLU.

  Attributes:
    planes: output channels.
    strides: stride of the first 3x3 conv and of the shortcut.
    dilation: dilation (= padding) of the second 3x3 conv.
    first_dilation: that of the first (strided) 3x3 conv.
    dtype: computation dtype.
    remat: rematerialise the block in the backward pass.
  """
  planes: int
  strides: int = 1
  dilation: int = 1
  first_dilation: int = 1
  dtype: Any = jnp.float32
  remat: bool = False

  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    return layers.maybe_remat(BasicBlock._block, self.remat, (2,))(
        self, x, train)

  def _block(self, x: jax.Array, train: bool) -> jax.Array:
    d0, d = self.first_dilation, self.dilation
    y = _conv(self.planes, 3, self.strides, d0, d0, self.dtype, 'conv1')(x)
    y = nn.relu(_bn(train, self.dtype, 'bn1')(y))
    y = _conv(self.planes, 3, 1, d, d, self.dtype, 'conv2')(y)
    y = _bn(train, self.dtype, 'bn2')(y)
    return nn.relu(y + _shortcut(x, self.planes, self.strides, train,
                                 self.dtype))


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided, dilated) -> 1x1 (x4 channels) plus shortcut.

  torchvision's v1.5: the stride sits on the 3x3 conv, not the first 1x1.

  Attributes:
    planes: width of the 1x1/3x3 convs; the output has ``4 * planes``.
    strides: stride of the 3x3 conv and of the shortcut.
    dilation: unused (the stage's rate; kept for a common block signature).
    first_dilation: dilation (= padding) of the 3x3 conv.
    dtype: computation dtype.
    remat: rematerialise the block in the backward pass.
  """
  planes: int
  strides: int = 1
  dilation: int = 1
  first_dilation: int = 1
  dtype: Any = jnp.float32
  remat: bool = False

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    return layers.maybe_remat(Bottleneck._block, self.remat, (2,))(
        self, x, train)

  def _block(self, x: jax.Array, train: bool) -> jax.Array:
    d = self.first_dilation
    y = _conv(self.planes, 1, 1, 0, 1, self.dtype, 'conv1')(x)
    y = nn.relu(_bn(train, self.dtype, 'bn1')(y))
    y = _conv(self.planes, 3, self.strides, d, d, self.dtype, 'conv2')(y)
    y = nn.relu(_bn(train, self.dtype, 'bn2')(y))
    out = self.planes * self.expansion
    y = _conv(out, 1, 1, 0, 1, self.dtype, 'conv3')(y)
    y = _bn(train, self.dtype, 'bn3')(y)
    return nn.relu(y + _shortcut(x, out, self.strides, train, self.dtype))


def _shortcut(x, features, strides, train, dtype):
  """Identity, or torchvision's ``downsample`` (1x1 strided conv + BN) when
  the stride or channel count changes. Called inside a block's compact
  ``__call__``, so the modules are the block's children."""
  if strides == 1 and x.shape[-1] == features:
    return x
  x = _conv(features, 1, strides, 0, 1, dtype, 'downsample_conv')(x)
  return _bn(train, dtype, 'downsample_bn')(x)


class ResNet(nn.Module):
  """torchvision ResNet trunk without the classifier (module doc has the API).

  Attributes:
    depth: 18, 34, 50, 101 or 152.
    output_stride: 32 (plain), 16 or 8 (dilated last stage(s)).
    width_mult: scales every channel count (1.0 = torchvision; e.g. 1/16
      for tests).
    dtype: computation dtype; params and BN statistics stay float32.
    multi_grid: per-block multipliers of layer4's dilation (DeepLabV3), one
      per layer4 block, or ``None`` for torchvision's rule.
    remat: rematerialise every residual block in the backward pass.
  """
  depth: int
  output_stride: int = 32
  width_mult: float = 1.0
  dtype: Any = jnp.float32
  multi_grid: Sequence[int] | None = None
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """``x`` ``[B, H, W, C]`` -> features keyed by :data:`STAGES`."""
    bottleneck, blocks = _check_depth(self.depth)
    _check_output_stride(self.output_stride)
    if x.ndim != 4:
      raise ValueError(f'ResNet expects NHWC input [B, H, W, C], got shape '
                       f'{x.shape}')
    if self.multi_grid is not None and len(self.multi_grid) != blocks[3]:
      raise ValueError(f'ResNet-{self.depth} multi_grid needs {blocks[3]} '
                       f'values (one per layer4 block), got '
                       f'{tuple(self.multi_grid)}')
    block_cls = Bottleneck if bottleneck else BasicBlock
    feats = {}
    h = x.astype(self.dtype)
    h = _conv(scaled_width(64, self.width_mult), 7, 2, 3, 1, self.dtype,
              'conv1')(h)
    h = nn.relu(_bn(train, self.dtype, 'bn1')(h))
    feats['conv1'] = h
    h = layers.max_pool(h, 3, 2, padding=1)
    feats['stem'] = h

    # Which stages trade their stride for dilation (replace_stride_with_dilation).
    dilate = {32: (False, False, False), 16: (False, False, True),
              8: (False, True, True)}[self.output_stride]
    dilation = 1
    for i, (planes, n) in enumerate(zip(_PLANES, blocks, strict=True)):
      stride = 1 if i == 0 else 2
      previous = dilation
      if i > 0 and dilate[i - 1]:
        dilation *= stride
        stride = 1
      for j in range(n):
        # Block 0 carries the stride; under dilation its strided 3x3 conv
        # keeps the previous stage's rate (torchvision's _make_layer).
        d0, d = (previous if j == 0 else dilation), dilation
        if i == 3 and self.multi_grid is not None:
          d0 = d = dilation * int(self.multi_grid[j])
        h = block_cls(scaled_width(planes, self.width_mult),
                      strides=stride if j == 0 else 1, dilation=d,
                      first_dilation=d0, dtype=self.dtype, remat=self.remat,
                      name=f'layer{i + 1}_{j}')(h, train=train)
      feats[f'layer{i + 1}'] = h
    return feats
