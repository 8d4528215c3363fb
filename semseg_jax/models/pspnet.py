"""PSPNet: Pyramid Scene Parsing Network (Zhao et al., CVPR 2017).

Layer for layer pytorch-semseg's ``ptsemseg/models/pspnet.py`` (itself the
authors' Caffe network): a deep-stem ResNet (``block_config`` (3, 4, 23, 3)
= ResNet-101 for VOC / Cityscapes, (3, 4, 6, 3) = ResNet-50 for ADE20K)
whose last two stages are dilated (2 and 4) so that features stay at 1/8 of
the input, the pyramid pooling module (bins 6, 3, 2, 1, concatenated with
its input: 2048 + 4 x 512 channels), ``cbr_final`` (3x3 conv-BN-ReLU to
512), Dropout2d(0.1), a 1x1 ``classification`` conv and bilinear
(``align_corners=True``) upsampling to the input size.

In training the network also returns the paper's auxiliary head on the
output of ``res_block4`` (3x3 conv-BN-ReLU to 256, the same Dropout2d,
1x1 conv): ``aux = (logits at 1/8,)``; the loss upsamples it (weight 0.4 in
the paper, ``config.loss.aux_weights``). Its parameters exist in every mode
(upstream's parameter count includes them).

Pyramid pooling (``pool_mode``): upstream pools with ``kernel = stride =
int(n / bin)`` (``'floor'``, the converter's parity mode), which for maps
not divisible by the bin drops border pixels and can give more than ``bin``
outputs; the default ``'adaptive'`` is the paper's / ``AdaptiveAvgPool2d``
binning and works at any input size. Both agree at upstream's input sizes
(473: a 60x60 map; 713: 90x90).

Batch size 1: a 1x1 bin gives each BatchNorm channel of its branch a single
value in training. Upstream (torch) raises there; the authors train with
BatchNorm statistics over the whole multi-GPU batch (16), which is what a
sharded ``jax.jit`` gives here too. With ``pool_norm='batch'`` and batch 1
the branch normalises to its BatchNorm bias (finite, but that branch's conv
gets no gradient); ``pool_norm='group'`` (GroupNorm, same parameter count)
or ``'none'`` (conv bias) make every branch trainable at batch 1.

Parameter counts equal upstream's: 68,073,706 (ResNet-101, 21 classes),
68,072,166 (19 classes), 49,180,908 (ResNet-50, 150 classes).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from semseg_jax.models import layers
from semseg_jax.models import register
from semseg_jax.models.backbones.psp_resnet import DeepStem
from semseg_jax.models.backbones.psp_resnet import PyramidPooling
from semseg_jax.models.backbones.psp_resnet import ResidualStage
from semseg_jax.models.backbones.vgg import scaled_width
from semseg_jax.models.output import SegmentationOutput

@register('pspnet')
class PSPNet(nn.Module):
  """PSPNet with a dilated deep-stem ResNet (module doc).

  Attributes:
    num_classes: ``K``.
    block_config: bottleneck blocks per stage (ResNet-101: (3, 4, 23, 3)).
    bins: pyramid pooling levels.
    pool_mode: ``'adaptive'`` (default) or ``'floor'`` (upstream).
    pool_norm: ``'batch'`` (upstream), ``'group'`` or ``'none'``: the norm
      of the pyramid branches (module doc, batch size 1).
    dropout_rate: Dropout2d rate before both classifiers.
    width_mult: scales every channel count (1.0 = the paper's network).
    dtype: computation dtype; params, BatchNorm statistics and logits
      float32.
    remat: rematerialise every bottleneck and the pyramid pooling module in
      the backward pass (less activation memory, same values).
  """
  num_classes: int
  block_config: Sequence[int] = (3, 4, 23, 3)
  bins: Sequence[int] = (6, 3, 2, 1)
  pool_mode: str = 'adaptive'
  pool_norm: str = 'batch'
  dropout_rate: float = 0.1
  width_mult: float = 1.0
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> SegmentationOutput:
    """``x`` ``[B, H, W, 3]`` -> logits ``[B, H, W, K]`` float32 (any H, W
    with ``'adaptive'``; the 1/8 map must be at least 6x6 with ``'floor'``);
    in training ``aux = (res4 logits [B, ceil(H/8), ceil(W/8), K],)``."""
    if x.ndim != 4:
      raise ValueError(f'PSPNet expects NHWC input, got shape {x.shape}')
    if len(self.block_config) != 4:
      raise ValueError('block_config must give 4 stages, got '
                       f'{tuple(self.block_config)}')
    in_hw = x.shape[1:3]
    wd = functools.partial(scaled_width, width_mult=self.width_mult)
    stage = functools.partial(ResidualStage, dtype=self.dtype,
                              remat=self.remat)
    cbr = functools.partial(layers.ConvBNAct, kernel_size=3, padding=1,
                            use_bias=False, dtype=self.dtype)

    def drop(h):  # Dropout2d: one mask value per (sample, channel)
      return nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2),
                        deterministic=not train)(h)

    def classifier(name):
      return layers.conv(self.num_classes, 1, dtype=self.dtype, name=name)

    b = self.block_config
    h = DeepStem((wd(64), wd(64), wd(128)), dtype=self.dtype,
                 name='stem')(x.astype(self.dtype), train=train)  # 1/4
    h = stage(b[0], wd(64), wd(256), name='res_block2')(h, train=train)
    h = stage(b[1], wd(128), wd(512), strides=2,
              name='res_block3')(h, train=train)  # 1/8
    h = stage(b[2], wd(256), wd(1024), dilation=2,
              name='res_block4')(h, train=train)

    aux = ()
    if train or self.is_initializing():  # upstream counts these params
      a = cbr(wd(256), name='convbnrelu4_aux')(h, train=train)
      a = classifier('aux_cls')(drop(a))
      if train:
        aux = (a.astype(jnp.float32),)

    h = stage(b[3], wd(512), wd(2048), dilation=4,
              name='res_block5')(h, train=train)
    h = PyramidPooling(tuple(self.bins), 'cat', self.pool_mode, 'apply',
                       self.pool_norm, self.dtype, self.remat,
                       name='pyramid_pooling')(h, train=train)
    h = cbr(wd(512), name='cbr_final')(h, train=train)
    h = classifier('classification')(drop(h))
    logits = layers.resize(h.astype(jnp.float32), in_hw, 'bilinear',
                           align_corners=True)
    return SegmentationOutput(logits=logits, aux=aux)
