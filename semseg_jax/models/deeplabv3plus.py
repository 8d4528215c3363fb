"""DeepLabV3+ (Chen, Zhu, Papandreou, Schroff & Adam, ECCV 2018; 1802.02611).

Encoder: a torchvision-layout ResNet (101 by default, 50 or 152 as options)
whose last stage(s) trade their stride for dilation (``rhs_dilation``) to
reach ``output_stride`` 16 (8 option), followed by Atrous Spatial Pyramid
Pooling (DeepLabV3): image pooling (global average -> 1x1 conv -> broadcast),
a 1x1 conv and three 3x3 atrous convs with rates 6/12/18 (doubled at output
stride 8), each 256 channels + BatchNorm + ReLU, concatenated, projected by a
1x1 conv (256) and dropped out (rate 0.1).

Decoder: the stride-4 low-level features (ResNet ``layer1``) are reduced to
48 channels by a 1x1 conv; the ASPP output is upsampled bilinearly to their
size, the two are concatenated (ASPP first) and refined by two 3x3 convs
(256); a 1x1 classifier gives the logits, upsampled bilinearly to the input.

Details the paper leaves open follow the authors' TensorFlow code
(tensorflow/models ``research/deeplab/model.py``): every conv before a
BatchNorm has no bias; the branch order is image pooling, 1x1, rates 6/12/18;
the only dropout (keep 0.9) follows the ASPP projection; all bilinear resizes
use ``align_corners=True``, which aligns exactly for sizes ``16n + 1`` (e.g.
the paper's 513) with torchvision's padding; the paper's Xception backbone and
separable convolutions are not implemented (the ResNet-101 variant of the
paper's Table 3). Any input size works (the pooling branch is a global mean,
where TF averages a crop-size window: the same for crop-sized inputs).

At ``num_classes=21`` and width 1 the network has 59,344,309 parameters
(ResNet-101 without fc 42,500,160; ASPP 15,535,104; decoder and classifier
1,309,045), the figure usually quoted for DeepLabV3+ ResNet-101 (59.34M, e.g.
jfzhang95/pytorch-deeplab-xception, whose layers have the same shapes).
ResNet-50: 40,352,181.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from semseg_jax.models import layers
from semseg_jax.models import register
from semseg_jax.models.backbones.resnet import ResNet
from semseg_jax.models.backbones.vgg import scaled_width
from semseg_jax.models.output import SegmentationOutput

# The paper's rates at output stride 16; they scale with 16 / output_stride.
_BASE_RATES = (6, 12, 18)
_OUTPUT_STRIDES = (8, 16, 32)


def default_atrous_rates(output_stride: int) -> tuple[int, ...]:
  """ASPP rates for ``output_stride``: (6, 12, 18) at 16, (12, 24, 36) at 8,
  (3, 6, 9) at 32 (the TF reference's advice: rates follow the stride)."""
  if output_stride not in _OUTPUT_STRIDES:
    raise ValueError(f'deeplabv3plus output_stride must be one of '
                     f'{_OUTPUT_STRIDES}, got {output_stride!r}')
  return tuple(r * 16 // output_stride for r in _BASE_RATES)


def _conv_bn_relu(features: int, kernel: int, dilation: int, dtype,
                  name: str) -> layers.ConvBNAct:
  # slim.conv2d with normalizer_fn=batch_norm: no bias, 'SAME' padding.
  return layers.ConvBNAct(features, kernel, dilation=dilation,
                          padding=dilation * (kernel // 2), use_bias=False,
                          dtype=dtype, name=name)


class ASPP(nn.Module):
  """Atrous Spatial Pyramid Pooling with image-level features (DeepLabV3).

  The dropout that follows the projection is applied by the caller, so that
  it can run while BatchNorm is frozen.

  Attributes:
    features: channels of every branch and of the projection (paper: 256).
    rates: dilation of the 3x3 branches.
    dtype: computation dtype.
  """
  features: int
  rates: Sequence[int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """``x`` ``[B, h, w, C]`` -> ``[B, h, w, features]``; ``train`` selects
    batch (True) or running (False) BatchNorm statistics."""
    b, h, w, _ = x.shape
    # Image pooling: mean in float32 (a bfloat16 sum over 33x33 loses bits).
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
    pooled = _conv_bn_relu(self.features, 1, 1, self.dtype, 'image_pool')(
        pooled.astype(self.dtype), train=train)
    # Bilinear upsampling of a 1x1 map is a broadcast.
    branches = [jnp.broadcast_to(pooled, (b, h, w, self.features))]
    branches.append(_conv_bn_relu(self.features, 1, 1, self.dtype, 'aspp0')(
        x, train=train))
    for i, rate in enumerate(self.rates, start=1):
      branches.append(_conv_bn_relu(self.features, 3, int(rate), self.dtype,
                                    f'aspp{i}')(x, train=train))
    y = jnp.concatenate(branches, axis=-1)
    return _conv_bn_relu(self.features, 1, 1, self.dtype, 'projection')(
        y, train=train)


@register('deeplabv3plus')
class DeepLabV3Plus(nn.Module):
  """DeepLabV3+ with a ResNet encoder (module doc).

  Attributes:
    num_classes: ``K``.
    resnet_depth: 50, 101 (default) or 152 (18/34 also build).
    output_stride: 16 (paper's training setting), 8 (its best evaluation
      setting) or 32; the parameters do not depend on it, so a network
      trained at 16 can be evaluated at 8 with the same variables.
    atrous_rates: ASPP rates; ``None`` = :func:`default_atrous_rates`.
    multi_grid: per-block multipliers of ``layer4``'s dilation (DeepLabV3's
      ``(1, 2, 4)``); ``None`` keeps torchvision's rule.
    dropout_rate: dropout after the ASPP projection.
    freeze_bn: use the running BatchNorm statistics during training and leave
      them unchanged (TF reference ``fine_tune_batch_norm=False``, its advice
      for small batches and for the output-stride-8 fine-tuning stage).
    width_mult: scales every channel count, backbone and head (1.0 = paper;
      small values for tests).
    dtype: computation dtype; params float32, logits float32.
  """
  num_classes: int
  resnet_depth: int = 101
  output_stride: int = 16
  atrous_rates: Sequence[int] | None = None
  multi_grid: Sequence[int] | None = None
  dropout_rate: float = 0.1
  freeze_bn: bool = False
  width_mult: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> SegmentationOutput:
    """``x`` ``[B, H, W, C]`` -> logits ``[B, H, W, K]`` float32, any H, W."""
    if x.ndim != 4:
      raise ValueError(f'deeplabv3plus expects NHWC input [B, H, W, C], got '
                       f'shape {x.shape}')
    rates = (default_atrous_rates(self.output_stride)
             if self.atrous_rates is None else tuple(self.atrous_rates))
    if not rates or any(int(r) < 1 for r in rates):
      raise ValueError(f'deeplabv3plus atrous_rates must be positive ints, '
                       f'got {self.atrous_rates!r}')
    bn_train = train and not self.freeze_bn
    in_hw = x.shape[1:3]
    feats = ResNet(self.resnet_depth, output_stride=self.output_stride,
                   width_mult=self.width_mult, dtype=self.dtype,
                   multi_grid=self.multi_grid, name='backbone')(
                       x, train=bn_train)
    width = scaled_width(256, self.width_mult)
    y = ASPP(width, rates, self.dtype, name='aspp')(feats['layer4'],
                                                   train=bn_train)
    # TF reference: slim.dropout(keep_prob=0.9) after the ASPP projection,
    # the network's only dropout; it follows `train`, not `freeze_bn`.
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    low = _conv_bn_relu(scaled_width(48, self.width_mult), 1, 1, self.dtype,
                        'low_level')(feats['layer1'], train=bn_train)
    y = layers.resize(y, low.shape[1:3], 'bilinear', align_corners=True)
    y = jnp.concatenate([y, low], axis=-1)
    y = _conv_bn_relu(width, 3, 1, self.dtype, 'decoder_conv1')(
        y, train=bn_train)
    y = _conv_bn_relu(width, 3, 1, self.dtype, 'decoder_conv2')(
        y, train=bn_train)
    logits = layers.conv(self.num_classes, 1, dtype=self.dtype,
                         name='classifier')(y)
    logits = layers.resize(logits, in_hw, 'bilinear', align_corners=True)
    return SegmentationOutput(logits=logits.astype(jnp.float32))
