"""FCN-32s, FCN-16s and FCN-8s (Long, Shelhamer & Darrell, CVPR 2015).

Layer for layer the networks of pytorch-semseg's ``ptsemseg/models/fcn.py``:
a VGG16 trunk whose first convolution pads by 100 pixels, a classifier
``fc6`` (7x7 valid conv, 4096) -> ReLU -> Dropout2d -> ``fc7`` (1x1, 4096) ->
ReLU -> Dropout2d -> ``score_fr`` (1x1, K), and 1x1 ``score_pool4`` /
``score_pool3`` skip scores fused by addition.

How coarse scores reach the input resolution is the ``upsample`` option:

* ``'learned'`` (FCN-8s default, upstream's ``learned_billinear=True``):
  bias-free transposed convolutions initialised to bilinear filters, with the
  paper's crops — FCN-8s ``upscore2`` (4, /2) + ``score_pool4`` cropped at 5,
  ``upscore4`` (4, /2) + ``score_pool3`` cropped at 9, ``upscore8`` (16, /8)
  cropped at 31. Upstream raises ``NotImplementedError`` for FCN-32s/16s; here
  they follow the paper's Caffe nets: FCN-32s ``upscore`` (64, /32) cropped at
  19; FCN-16s ``upscore2`` (4, /2) + ``score_pool4`` at 5, ``upscore16``
  (32, /16) cropped at 27.
* ``'nearest'`` (FCN-32s / FCN-16s default): upstream's ``F.upsample`` (legacy
  nearest) of the whole padded score map to the skip's / input's size, then
  addition. Note this squeezes the 100-pixel padding border into the output,
  exactly as upstream does.
* ``'bilinear'``: the same graph as ``'nearest'`` with half-pixel bilinear
  resizing.

With these defaults the parameter counts at K=21 equal upstream's:
FCN-32s 134,346,581, FCN-16s 134,357,354, FCN-8s 134,489,759.
"""
from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from semseg_jax.models import layers
from semseg_jax.models import register
from semseg_jax.models.backbones.vgg import VGG16, scaled_width
from semseg_jax.models.output import SegmentationOutput

_UPSAMPLE = ('learned', 'nearest', 'bilinear')

# Learned path: (name, kernel, stride) of each transposed conv, the skip
# fused after it and that skip's crop offset, and the final crop offset.
# The offsets are those of the reference Caffe FCNs (and of pytorch-semseg's
# fcn8s), which align score maps given conv1_1's 100-pixel padding.
_LEARNED = {
    32: dict(ups=(('upscore', 64, 32),), skips=(), final_crop=19),
    16: dict(ups=(('upscore2', 4, 2), ('upscore16', 32, 16)),
             skips=(('pool4', 5),), final_crop=27),
    8: dict(ups=(('upscore2', 4, 2), ('upscore4', 4, 2), ('upscore8', 16, 8)),
            skips=(('pool4', 5), ('pool3', 9)), final_crop=31),
}


class _FCN(nn.Module):
  """Shared FCN body; subclasses fix the output stride.

  Attributes:
    num_classes: ``K``.
    upsample: ``'learned'``, ``'nearest'`` or ``'bilinear'`` (module doc).
    width_mult: scales VGG and fc6/fc7 widths (1.0 = the paper's network).
    dropout_rate: Dropout2d rate after fc6 and fc7 (whole channels dropped).
    dtype: computation dtype; params float32, logits float32.
    remat: rematerialise each VGG block in the backward pass (less
      activation memory; same parameters and values).
  """
  num_classes: int
  upsample: str = 'nearest'
  width_mult: float = 1.0
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  remat: bool = False

  output_stride: ClassVar[int] = 32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> SegmentationOutput:
    """``x`` ``[B, H, W, 3]`` -> logits ``[B, H, W, K]`` float32, any H, W."""
    if self.upsample not in _UPSAMPLE:
      raise ValueError(f'upsample must be one of {_UPSAMPLE}, '
                       f'got {self.upsample!r}')
    if x.ndim != 4:
      raise ValueError(f'FCN expects NHWC input, got shape {x.shape}')
    in_hw = x.shape[1:3]
    feats = VGG16(self.width_mult, conv1_padding=100, dtype=self.dtype,
                  remat=self.remat, name='backbone')(x)
    fc_width = scaled_width(4096, self.width_mult)

    def drop(h):  # Dropout2d: one mask value per (sample, channel)
      return nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2),
                        deterministic=not train)(h)

    h = nn.relu(layers.conv(fc_width, 7, padding=0, dtype=self.dtype,
                            name='fc6')(feats['pool5']))
    h = drop(h)
    h = nn.relu(layers.conv(fc_width, 1, dtype=self.dtype, name='fc7')(h))
    h = drop(h)
    score = layers.conv(self.num_classes, 1, dtype=self.dtype,
                        name='score_fr')(h)

    skips = {32: (), 16: ('pool4',), 8: ('pool4', 'pool3')}[self.output_stride]
    skip_scores = [
        layers.conv(self.num_classes, 1, dtype=self.dtype,
                    name=f'score_{name}')(feats[name]) for name in skips
    ]
    if self.upsample == 'learned':
      out = self._learned(score, skip_scores, in_hw)
    else:
      for skip in skip_scores:
        score = layers.resize(score, skip.shape[1:3], self.upsample) + skip
      out = layers.resize(score, in_hw, self.upsample)
    return SegmentationOutput(logits=out.astype(jnp.float32))

  def _learned(self, score, skip_scores, in_hw):
    """Transposed-conv upsampling with the paper's crops."""
    spec = _LEARNED[self.output_stride]
    ups = [
        layers.ConvTranspose(self.num_classes, k, s, use_bias=False,
                             kernel_init=layers.bilinear_init(),
                             dtype=self.dtype, name=name)
        for name, k, s in spec['ups']
    ]
    for up, skip, (_, offset) in zip(ups[:-1], skip_scores, spec['skips'],
                                     strict=True):
      score = up(score)
      score = score + layers.crop(skip, offset, score.shape[1:3])
    return layers.crop(ups[-1](score), spec['final_crop'], in_hw)


@register('fcn32s')
class FCN32s(_FCN):
  """FCN-32s; upstream's default ``upsample='nearest'``."""
  upsample: str = 'nearest'
  output_stride: ClassVar[int] = 32


@register('fcn16s')
class FCN16s(_FCN):
  """FCN-16s; upstream's default ``upsample='nearest'``."""
  upsample: str = 'nearest'
  output_stride: ClassVar[int] = 16


@register('fcn8s')
class FCN8s(_FCN):
  """FCN-8s; upstream's default ``upsample='learned'``."""
  upsample: str = 'learned'
  output_stride: ClassVar[int] = 8
