"""LinkNet (Chaurasia & Culurciello, arXiv 1707.03718).

pytorch-semseg's ``linknet`` never constructs (it assigns ``decoder4`` four
times, passes float channel counts and calls a non-existent
``nn.deconv2DBatchNormRelu``), so this is the paper's network, layer for layer
as in the authors' PyTorch release (e-lab/pytorch-linknet, ``LinkNet``):

* initial block and encoder: a ResNet-18 (``backbones.resnet``, module
  ``encoder``): 7x7/2 conv -> BN -> ReLU -> 3x3/2 max-pool, then the four
  stages ``layer1``..``layer4`` (64, 128, 256, 512 channels; strides 4, 8,
  16, 32). As in the authors' code ``layer1`` keeps the stride (the paper's
  Fig. 3 draws a /2 in every encoder block, but Table 1's sizes and the
  released ResNet-18 encoder do not).
* decoder block ``i`` (``m`` -> ``n`` channels): 1x1 conv (m -> m/4) ->
  3x3 transposed conv (m/4 -> m/4; stride 2, except stride 1 in decoder 1)
  -> 1x1 conv (m/4 -> n), each followed by BN + ReLU, convolutions without
  bias. The output is added to the input of encoder block ``i`` (paper Fig.
  1): ``d4 = e3 + dec4(e4)``, ``d3 = e2 + dec3(d4)``, ``d2 = e1 + dec2(d3)``,
  ``d1 = stem + dec1(d2)``.
* final block: 3x3 transposed conv stride 2 (64 -> 32) -> BN -> ReLU, 3x3
  conv (32 -> 32) -> BN -> ReLU, 2x2 transposed conv stride 2 (32 -> K)
  giving the logits; these three keep their biases (authors' code).

Sizes: the authors use ``output_padding=1`` everywhere, which only fits
inputs divisible by 32. Here each stride-2 transposed conv takes
``output_padding = 1`` when the map it must match (the skip, or ``conv1``'s
output for the final block) has even size and 0 when odd, so its output
equals the skip exactly (for even sizes this is the authors' network;
``output_padding`` only appends a row/column, so an odd size gives the
authors' result with that row cropped). The last 2x2 stride-2 transposed conv
returns ``2 * ceil(H / 2)`` rows, cropped to ``H``. Any ``H, W >= 1`` works.

Parameters at K=19 (ResNet-18): 11,535,699 (paper: 11.5M); forward FLOPs
at 360x640 (XLA cost analysis): 18.9 G (paper: 21.2 G). Initialise the
encoder from torchvision's ImageNet ResNet-18 with
``semseg_jax.convert.resnet.load_backbone`` (or its command line), as the
paper does.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from semseg_jax.models import layers
from semseg_jax.models import register
from semseg_jax.models.backbones import resnet as resnet_lib
from semseg_jax.models.backbones.vgg import scaled_width
from semseg_jax.models.output import SegmentationOutput


def _bn(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
  # torch BatchNorm2d defaults (momentum 0.1 = Flax 0.9, eps 1e-5).
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32,
                      name=name)


def _output_padding(target_hw) -> tuple[int, int]:
  """``output_padding`` making a (k=3, s=2, p=1) transposed conv of a
  ``ceil(n / 2)`` map return exactly ``n``: ``2 * ceil(n / 2) - 1 + op``."""
  return tuple(1 - n % 2 for n in target_hw)


class LinkNetDecoder(nn.Module):
  """1x1 (m -> m/4) -> 3x3 transposed (stride s) -> 1x1 (m/4 -> n), each
  conv-BN-ReLU.

  Attributes:
    features: output channels ``n``.
    strides: 2 (upsampling) or 1 (decoder 1).
    dtype: computation dtype.
  """
  features: int
  strides: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, out_hw, *, train: bool) -> jax.Array:
    """``x`` ``[B, h, w, m]`` -> ``[B, *out_hw, n]``; ``out_hw`` must be
    ``(2h - 1 or 2h, 2w - 1 or 2w)`` for stride 2, ``(h, w)`` for 1."""
    mid = x.shape[-1] // 4
    x = layers.ConvBNAct(mid, 1, use_bias=False, dtype=self.dtype,
                         name='conv1')(x, train=train)
    op = _output_padding(out_hw) if self.strides == 2 else (0, 0)
    x = layers.ConvTranspose(mid, 3, self.strides, padding=1,
                             output_padding=op, use_bias=False,
                             dtype=self.dtype, name='tp_conv')(x)
    x = nn.relu(_bn(train, self.dtype, 'tp_bn')(x))
    x = layers.ConvBNAct(self.features, 1, use_bias=False, dtype=self.dtype,
                         name='conv2')(x, train=train)
    if x.shape[1:3] != tuple(out_hw):  # cannot happen with a ResNet encoder
      raise ValueError(f'LinkNet decoder output {x.shape[1:3]} does not match '
                       f'the skip {tuple(out_hw)}')
    return x


@register('linknet')
class LinkNet(nn.Module):
  """LinkNet with a torchvision-layout ResNet encoder.

  Attributes:
    num_classes: ``K``.
    encoder_depth: ResNet depth of the encoder (18 = the paper; 34, 50, 101,
      152 also work, decoders then take the stage widths).
    width_mult: scales every channel count (1.0 = the paper; small for
      tests).
    dtype: computation dtype; params float32, logits float32.

  Params: ``encoder`` (the ResNet, torchvision names), ``decoder1`` ..
  ``decoder4`` (``conv1``, ``tp_conv``, ``tp_bn``, ``conv2``), ``tp_conv1``,
  ``tp_bn1``, ``conv2`` (conv, bn), ``tp_conv2``.
  """
  num_classes: int
  encoder_depth: int = 18
  width_mult: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> SegmentationOutput:
    """``x`` ``[B, H, W, C]`` -> logits ``[B, H, W, K]`` float32, any H, W."""
    if x.ndim != 4:
      raise ValueError(f'LinkNet expects NHWC input [B, H, W, C], got shape '
                       f'{x.shape}')
    in_hw = x.shape[1:3]
    feats = resnet_lib.ResNet(self.encoder_depth, width_mult=self.width_mult,
                              dtype=self.dtype, name='encoder')(x, train=train)
    # Encoder block i's input is added to decoder block i's output.
    skips = ('stem', 'layer1', 'layer2', 'layer3')
    d = feats['layer4']
    for i in (4, 3, 2, 1):
      skip = feats[skips[i - 1]]
      d = LinkNetDecoder(skip.shape[-1], strides=1 if i == 1 else 2,
                         dtype=self.dtype, name=f'decoder{i}')(
                             d, skip.shape[1:3], train=train)
      d = d + skip

    width = scaled_width(32, self.width_mult)
    conv1_hw = feats['conv1'].shape[1:3]
    y = layers.ConvTranspose(width, 3, 2, padding=1,
                             output_padding=_output_padding(conv1_hw),
                             dtype=self.dtype, name='tp_conv1')(d)
    y = nn.relu(_bn(train, self.dtype, 'tp_bn1')(y))
    y = layers.ConvBNAct(width, 3, padding=1, dtype=self.dtype,
                         name='conv2')(y, train=train)
    y = layers.ConvTranspose(self.num_classes, 2, 2, dtype=self.dtype,
                             name='tp_conv2')(y)
    # 2 * ceil(H / 2) rows: drop the extra one of an odd size.
    logits = y[:, :in_hw[0], :in_hw[1]]
    return SegmentationOutput(logits=logits.astype(jnp.float32))
