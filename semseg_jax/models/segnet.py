"""SegNet (Badrinarayanan, Kendall & Cipolla, TPAMI 2017), as in pytorch-semseg.

Encoder: the 13 convolutions of VGG16 in five blocks (2, 2, 3, 3, 3 convs of
64, 128, 256, 512, 512 channels), each 3x3 conv (padding 1, with bias) ->
BatchNorm -> ReLU, each block ending in a 2x2 stride-2 max-pool that keeps
the argmax of every window. Decoder: the mirror image; each block first
*unpools* its input by scattering every value back to the position its
encoder's pool took it from (zeros elsewhere, no learned upsampling), then
applies 3x3 conv -> BatchNorm -> ReLU layers: ``up5`` 512, 512, 512; ``up4``
512, 512, 256; ``up3`` 256, 256, 128; ``up2`` 128, 64; ``up1`` 64, K.

Two choices differ between the paper's Caffe SegNet and pytorch-semseg:

* ``final_bn_relu``: upstream's last layer (``up1.conv2``) is a conv ->
  BatchNorm -> ReLU like every other, so its "logits" are non-negative. The
  Caffe model's last layer is a plain 3x3 conv feeding the softmax; that is
  our default. ``final_bn_relu=True`` (what the converter builds) reproduces
  upstream.
* ``ceil_mode``: Caffe pools with ceil rounding, so every pixel takes part
  and any input size works (its CamVid net unpools 23 -> 45 rows). Upstream's
  ``MaxPool2d(2, 2)`` floors: an odd row/column is never pooled, comes back
  as zeros after unpooling, and inputs need ``H, W >= 32``. Default
  ``True``; the converter builds ``False``.

At ``K = 21`` the parity network has upstream's 29,455,167 parameters (BN
scale/bias included, running statistics not); the default network has 42
fewer (the final BatchNorm).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from semseg_jax.models import layers
from semseg_jax.models import register
from semseg_jax.models.backbones.vgg import scaled_width
from semseg_jax.models.output import SegmentationOutput

# (name, output channels of each conv) at width_mult=1.
ENCODER = (('down1', (64, 64)), ('down2', (128, 128)),
            ('down3', (256, 256, 256)), ('down4', (512, 512, 512)),
            ('down5', (512, 512, 512)))
# Decoder blocks in the order they run; `None` is the number of classes.
DECODER = (('up5', (512, 512, 512)), ('up4', (512, 512, 256)),
            ('up3', (256, 256, 128)), ('up2', (128, 64)), ('up1', (64, None)))
# Floor pooling five times needs at least 2**5 pixels.
_FLOOR_MIN_SIZE = 32


class _ConvStack(nn.Module):
  """3x3 conv -> BatchNorm -> ReLU layers ``conv1``, ``conv2``, ...

  ``last_bn_relu=False`` leaves the last layer a plain conv (class scores).
  """
  widths: tuple[int, ...]
  last_bn_relu: bool = True
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    return layers.maybe_remat(_ConvStack._layers, self.remat, (2,))(
        self, x, train)

  def _layers(self, x: jax.Array, train: bool) -> jax.Array:
    for i, c in enumerate(self.widths, 1):
      bn_relu = self.last_bn_relu or i < len(self.widths)
      x = layers.ConvBNAct(c, 3, padding=1, norm=bn_relu,
                           act=nn.relu if bn_relu else None, dtype=self.dtype,
                           name=f'conv{i}')(x, train=train)
    return x


@register('segnet')
class SegNet(nn.Module):
  """SegNet with max-pooling indices carried from encoder to decoder.

  Attributes:
    num_classes: ``K``.
    in_channels: expected input channels (checked).
    width_mult: scales every hidden width (1.0 = the paper's network; e.g.
      1/16 for tests).
    ceil_mode: ceil-rounded pooling (Caffe SegNet, any size) or floor
      (upstream parity, ``H, W >= 32``); see the module doc.
    final_bn_relu: upstream's BatchNorm + ReLU on the class scores.
    dtype: computation dtype; params and BN statistics float32, logits
      float32.
    remat: rematerialise each conv block (encoder and decoder) in the
      backward pass; pooling indices are kept.
  """
  num_classes: int
  in_channels: int = 3
  width_mult: float = 1.0
  ceil_mode: bool = True
  final_bn_relu: bool = False
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> SegmentationOutput:
    """``x`` ``[B, H, W, in_channels]`` -> logits ``[B, H, W, K]`` float32."""
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f'segnet expects [B, H, W, {self.in_channels}] input '
                       f'(in_channels={self.in_channels}), got {x.shape}')
    h, w = x.shape[1:3]
    if not self.ceil_mode and min(h, w) < _FLOOR_MIN_SIZE:
      raise ValueError(
          f'segnet with ceil_mode=False (upstream parity) needs H, W >= '
          f'{_FLOOR_MIN_SIZE} for its five 2x2 poolings, got {h}x{w}; use '
          'ceil_mode=True for smaller inputs')

    x = x.astype(self.dtype)
    pools = []  # (indices, pre-pool size) per encoder block
    for block, widths in ENCODER:
      widths = tuple(scaled_width(c, self.width_mult) for c in widths)
      x = _ConvStack(widths, dtype=self.dtype, remat=self.remat,
                     name=block)(x, train=train)
      hw = x.shape[1:3]
      x, indices = layers.max_pool_with_argmax(x, 2, 2,
                                               ceil_mode=self.ceil_mode)
      pools.append((indices, hw))

    for (block, widths), (indices, hw) in zip(DECODER, reversed(pools),
                                              strict=True):
      # Unpooling puts each value back where its encoder pool found it; the
      # stored size restores a row/column that pooling dropped or padded.
      x = layers.max_unpool(x, indices, hw, window=2)
      final = widths[-1] is None
      widths = tuple(self.num_classes if c is None else
                     scaled_width(c, self.width_mult) for c in widths)
      x = _ConvStack(widths, last_bn_relu=not final or self.final_bn_relu,
                     dtype=self.dtype, remat=self.remat,
                     name=block)(x, train=train)
    return SegmentationOutput(logits=x.astype(jnp.float32))
