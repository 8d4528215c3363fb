"""U-Net (Ronneberger, Fischer & Brox, MICCAI 2015) as pytorch-semseg has it.

Encoder: four ``UNetConv2`` blocks (two 3x3 conv -> BatchNorm -> ReLU) each
followed by a 2x2 max-pool, and a ``center`` block; filters
``[64, 128, 256, 512, 1024] / feature_scale``. Decoder: four ``UNetUp``
blocks, each a 2x2 stride-2 transposed conv (or x2 corner-aligned bilinear
upsampling when ``is_deconv=False``), concatenation ``[skip, up]`` and two
3x3 conv -> ReLU (no BatchNorm in the decoder, as upstream); a final 1x1
conv gives the logits.

``padding`` chooses how the 3x3 convolutions treat borders:

* ``'same'`` (default): padding 1, so feature maps keep their size; any
  ``H, W >= 16`` works (an odd-sized skip is matched by zero-padding the
  upsampled map at the bottom/right). Logits are at input resolution.
* ``'valid'``: upstream parity (padding 0). Only ``H, W = 12 (mod 16)`` and
  ``>= 188`` fit (e.g. 188, 204, 572); the logits then cover the **centre
  region** ``[B, H - 184, W - 184, K]`` (offset 92), exactly upstream's
  output. This is the one deviation from the "logits at input resolution"
  contract; use it for weight conversion and parity checks.
* ``'tile'``: the paper's overlap-tile strategy with the valid network:
  the input is mirror-padded (92 pixels plus whatever the size rule needs)
  and the logits cropped back to ``[B, H, W, K]``. Same weights as
  ``'valid'``, any input size, input-resolution logits.

Upstream crashes for ``is_deconv=False`` (its decoder conv expects
``in_size`` channels but receives ``in_size + out_size``); here the conv
takes the concatenation, so that variant works but has no upstream weights.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from semseg_jax.models import layers
from semseg_jax.models import register
from semseg_jax.models.output import SegmentationOutput

_PADDINGS = ('same', 'valid', 'tile')
# Valid mode: every 3x3 conv removes 2 pixels. The largest skip (after two
# convs) is H - 4; the logits are H - 184, i.e. the input's centre at 92.
_VALID_BORDER = 92
_VALID_MIN = 188


def _valid_size_ok(n: int) -> bool:
  return n >= _VALID_MIN and n % 16 == 12


def _tile_size(n: int) -> int:
  """Smallest valid-mode input covering ``n`` plus a 92-pixel border."""
  p = max(n + 2 * _VALID_BORDER, _VALID_MIN)
  return p + (12 - p) % 16


class UNetConv2(nn.Module):
  """Two 3x3 conv (+ BatchNorm) + ReLU, upstream's ``unetConv2``."""
  features: int
  norm: bool
  padding: int
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    return layers.maybe_remat(UNetConv2._convs, self.remat, (2,))(
        self, x, train)

  def _convs(self, x: jax.Array, train: bool) -> jax.Array:
    for name in ('conv1', 'conv2'):
      x = layers.ConvBNAct(self.features, 3, padding=self.padding,
                           norm=self.norm, dtype=self.dtype, name=name)(
                               x, train=train)
    return x


class UNetUp(nn.Module):
  """Upsample ``below`` x2, fuse with ``skip``, two convs (``unetUp``)."""
  features: int
  is_deconv: bool
  padding: int
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, skip: jax.Array, below: jax.Array, *,
               train: bool) -> jax.Array:
    return layers.maybe_remat(UNetUp._up, self.remat, (3,))(
        self, skip, below, train)

  def _up(self, skip: jax.Array, below: jax.Array, train: bool) -> jax.Array:
    if self.is_deconv:
      up = layers.ConvTranspose(self.features, 2, 2, dtype=self.dtype,
                                name='up')(below)
    else:
      up = layers.resize(below, (2 * below.shape[1], 2 * below.shape[2]),
                         'bilinear', align_corners=True)
    if self.padding == 0:
      # Upstream pads the skip by (up - skip) // 2 per side, a centre crop
      # whenever the size rule holds (checked by UNet).
      skip = layers.center_crop(skip, up.shape[1:3])
    else:
      # Floor pooling of an odd size loses the last row/column.
      dh, dw = skip.shape[1] - up.shape[1], skip.shape[2] - up.shape[2]
      up = jnp.pad(up, ((0, 0), (0, dh), (0, dw), (0, 0)))
    x = jnp.concatenate([skip, up.astype(skip.dtype)], axis=-1)
    return UNetConv2(self.features, norm=False, padding=self.padding,
                     dtype=self.dtype, name='conv')(x, train=train)


@register('unet')
class UNet(nn.Module):
  """U-Net.

  Attributes:
    num_classes: ``K``.
    feature_scale: divides the widths 64..1024 (upstream default 4).
    is_deconv: transposed-conv upsampling (True) or bilinear (False).
    in_channels: expected input channels (checked).
    is_batchnorm: BatchNorm in the encoder blocks.
    padding: ``'same'``, ``'valid'`` (upstream parity) or ``'tile'``.
    dtype: computation dtype; params float32, logits float32.
    remat: rematerialise every encoder/decoder block in the backward pass.
  """
  num_classes: int
  feature_scale: float = 4
  is_deconv: bool = True
  in_channels: int = 3
  is_batchnorm: bool = True
  padding: str = 'same'
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> SegmentationOutput:
    """``x`` ``[B, H, W, in_channels]`` -> logits ``[B, H, W, K]`` float32
    (``[B, H - 184, W - 184, K]`` for ``padding='valid'``)."""
    if self.padding not in _PADDINGS:
      raise ValueError(f'unet padding must be one of {_PADDINGS}, '
                       f'got {self.padding!r}')
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f'unet expects [B, H, W, {self.in_channels}] input '
                       f'(in_channels={self.in_channels}), got {x.shape}')
    h, w = x.shape[1:3]
    if self.padding == 'valid' and not (_valid_size_ok(h) and
                                        _valid_size_ok(w)):
      raise ValueError(
          f"unet padding='valid' needs H and W = 12 (mod 16) and >= 188 "
          f"(e.g. 188, 204, 572), got {h}x{w}; use padding='tile' or 'same' "
          'for other sizes')
    if self.padding == 'same' and min(h, w) < 16:
      raise ValueError(f"unet padding='same' needs H, W >= 16, got {h}x{w}")
    if self.padding == 'tile':
      ph, pw = _tile_size(h), _tile_size(w)
      b = _VALID_BORDER
      x = jnp.pad(x, ((0, 0), (b, ph - h - b), (b, pw - w - b), (0, 0)),
                  mode='reflect')
    pad = 1 if self.padding == 'same' else 0

    filters = [int(c / self.feature_scale) for c in (64, 128, 256, 512, 1024)]
    x = x.astype(self.dtype)
    skips = []
    for i in range(4):
      x = UNetConv2(filters[i], self.is_batchnorm, pad, self.dtype,
                    self.remat, name=f'conv{i + 1}')(x, train=train)
      skips.append(x)
      x = layers.max_pool(x, 2, 2)
    x = UNetConv2(filters[4], self.is_batchnorm, pad, self.dtype, self.remat,
                  name='center')(x, train=train)
    for i in reversed(range(4)):
      x = UNetUp(filters[i], self.is_deconv, pad, self.dtype, self.remat,
                 name=f'up_concat{i + 1}')(skips[i], x, train=train)
    logits = layers.conv(self.num_classes, 1, dtype=self.dtype,
                         name='final')(x).astype(jnp.float32)
    if self.padding == 'tile':
      logits = logits[:, :h, :w]
    return SegmentationOutput(logits=logits)
