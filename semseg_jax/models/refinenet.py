"""RefineNet (Lin, Milan, Shen & Reid, CVPR 2017; arXiv 1611.06612).

4-cascaded multi-path refinement on a torchvision-layout ResNet (101 by
default, 50 or 152 as options; no dilation, output stride 32). Four
RefineNet blocks run from coarse to fine: RefineNet-4 takes ResNet ``layer4``
(stride 32) alone, RefineNet-k (k = 3, 2, 1) takes ``layer{k}`` and the output
of RefineNet-(k+1). Each block has

* adaptive convolution: a 3x3 conv (no bias) reducing the backbone features
  to the block's width, then 2 residual conv units (RCU: ReLU -> 3x3 conv
  with bias -> ReLU -> 3x3 conv without bias, plus the input);
* multi-resolution fusion (two inputs): a 3x3 conv (no bias) on each input
  to the block's width, the coarse one at its own resolution, then bilinear
  upsampling of the coarse map to the fine one and summation;
* chained residual pooling (CRP): ReLU, then a chain of 5x5 max-pools
  (stride 1) each followed by a 3x3 conv (no bias), every chain output summed
  onto the input;
* output convolutions: 3 RCUs.

RefineNet-1's output (stride 4, 256 channels) goes through dropout and a 3x3
classifier conv with bias; the logits are upsampled bilinearly to the input.
Widths are 512 for RefineNet-4 and 256 for the others. No BatchNorm outside
the backbone.

Where the paper leaves details open this follows the authors' released code
(guosheng/refinenet, ``gen_net_opts_model_type*.m``,
``gen_network_refine_group.m``, ``My_net_util.m``) and its PyTorch port that
loads their trained VOC weights (DrSleep/refinenet-pytorch): 2 adaptive RCUs
and 3 output RCUs in every block (the paper's figure draws one output RCU and
two extra RCUs before the softmax; the code's last block has those 3); the
input adaptation conv (``input_adapt_dim`` 512/256/256/256); CRP with pool
then conv in each stage, as in the paper's figure and the released models
(the training code also has a conv-before-pool variant). The number of
pooling stages is ``crp_stages``: 4 in the released VOC models (default), 2
in the training script's default configuration. Dropout 0.5 on ``layer4``,
``layer3`` and before the classifier, and ``align_corners=True`` upsampling,
follow the PyTorch port. The authors train with frozen BatchNorm statistics
in the ImageNet-pretrained ResNet (``bnorm_moment_type_trn='global'``):
``freeze_bn=True``.

Parameter names map to the PyTorch port (``g = 5 - k`` for ``refine{k}``):
``dimred`` = ``p_ims1d2_outl{g}_dimred``, ``adapt_rcu{i}.conv1/conv2`` =
``adapt_stage{g}_b.{i}_conv / {i}_conv_relu_varout_dimred``, ``fuse_fine`` =
``adapt_stage{g}_b2_joint_varout_dimred``, ``fuse_coarse`` =
``mflow_conv_g{g-1}_b3_joint_varout_dimred``, ``crp.conv{i}`` =
``mflow_conv_g{g}_pool.{i}_outvar_dimred``, ``out_rcu{i}`` =
``mflow_conv_g{g}_b``, ``classifier`` = ``clf_conv``.

At ``num_classes=21`` and width 1: RefineNet-101 118,052,437 parameters
(ResNet-101 without fc 42,500,160 + refinement path 75,552,277), exactly the
PyTorch port's (its tensors map one-to-one onto ours); RefineNet-50
99,060,309; RefineNet-152 133,696,085. Any input size works.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from semseg_jax.models import layers
from semseg_jax.models import register
from semseg_jax.models.backbones.resnet import ResNet
from semseg_jax.models.backbones.vgg import scaled_width
from semseg_jax.models.output import SegmentationOutput

# input_adapt_dims of the authors' code: RefineNet-4 (layer4) first.
_WIDTHS = (512, 256, 256, 256)


def _conv3x3(features: int, use_bias: bool, dtype, name: str) -> nn.Conv:
  return layers.conv(features, 3, padding=1, use_bias=use_bias, dtype=dtype,
                     name=name)


class ResidualConvUnit(nn.Module):
  """RCU: ``x + conv2(relu(conv1(relu(x))))``, 3x3 convs, no BatchNorm.

  ``conv1`` has a bias and ``conv2`` none, as in the authors' code.
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = _conv3x3(self.features, True, self.dtype, 'conv1')(nn.relu(x))
    y = _conv3x3(self.features, False, self.dtype, 'conv2')(nn.relu(y))
    return x + y


class ChainedResidualPooling(nn.Module):
  """CRP: ``x + sum_i t_i`` with ``t_i = conv_i(maxpool5x5(t_{i-1}))``,
  ``t_0 = x`` (the caller applies the leading ReLU).

  Max-pools are 5x5, stride 1, padding 2 (``-inf``), so sizes are kept.
  """
  features: int
  stages: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    top = x
    for i in range(self.stages):
      top = layers.max_pool(top, 5, 1, padding=2)
      top = _conv3x3(self.features, False, self.dtype, f'conv{i + 1}')(top)
      x = x + top
    return x


class RefineNetBlock(nn.Module):
  """One RefineNet block (module doc): adapt, fuse, CRP, output RCUs.

  Attributes:
    features: the block's width.
    crp_stages: pooling stages of the CRP.
    dtype: computation dtype.
  """
  features: int
  crp_stages: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, coarse: jax.Array | None = None
               ) -> jax.Array:
    """``x`` ``[B, h, w, C]`` backbone features; ``coarse`` ``[B, h', w', C']``
    the previous block's output (``None`` for RefineNet-4). Returns
    ``[B, h, w, features]``."""
    x = _conv3x3(self.features, False, self.dtype, 'dimred')(x)
    for i in (1, 2):
      x = ResidualConvUnit(self.features, self.dtype, name=f'adapt_rcu{i}')(x)
    if coarse is not None:
      x = _conv3x3(self.features, False, self.dtype, 'fuse_fine')(x)
      coarse = _conv3x3(self.features, False, self.dtype,
                        'fuse_coarse')(coarse)
      # The authors' sum layer resizes every input to the largest one.
      x = x + layers.resize(coarse, x.shape[1:3], 'bilinear',
                            align_corners=True)
    x = ChainedResidualPooling(self.features, self.crp_stages, self.dtype,
                               name='crp')(nn.relu(x))
    for i in (1, 2, 3):
      x = ResidualConvUnit(self.features, self.dtype, name=f'out_rcu{i}')(x)
    return x


@register('refinenet')
class RefineNet(nn.Module):
  """4-cascaded RefineNet on a ResNet (module doc).

  Attributes:
    num_classes: ``K``.
    resnet_depth: 50, 101 (default) or 152 (18/34 also build).
    crp_stages: max-pool + conv stages per chained residual pooling (4 in the
      authors' released models, 2 in their training script's default).
    dropout_rate: dropout on ``layer4``/``layer3`` and before the classifier.
    freeze_bn: use the ResNet's running BatchNorm statistics during training
      and leave them unchanged, as the authors do with ImageNet weights and
      batch 1. Leave it False when training from scratch.
    width_mult: scales every channel count, backbone and refinement path.
    dtype: computation dtype; params float32, logits float32.
  """
  num_classes: int
  resnet_depth: int = 101
  crp_stages: int = 4
  dropout_rate: float = 0.5
  freeze_bn: bool = False
  width_mult: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> SegmentationOutput:
    """``x`` ``[B, H, W, C]`` -> logits ``[B, H, W, K]`` float32, any H, W."""
    if x.ndim != 4:
      raise ValueError(f'refinenet expects NHWC input [B, H, W, C], got '
                       f'shape {x.shape}')
    if self.crp_stages < 1:
      raise ValueError(f'refinenet crp_stages must be >= 1, got '
                       f'{self.crp_stages!r}')
    in_hw = x.shape[1:3]
    feats = ResNet(self.resnet_depth, width_mult=self.width_mult,
                   dtype=self.dtype, name='backbone')(
                       x, train=train and not self.freeze_bn)

    def drop(h):  # elementwise, like the port's nn.Dropout
      return nn.Dropout(self.dropout_rate, deterministic=not train)(h)

    inputs = (drop(feats['layer4']), drop(feats['layer3']), feats['layer2'],
              feats['layer1'])
    y = None
    for k, (feat, width) in zip((4, 3, 2, 1), zip(inputs, _WIDTHS)):
      y = RefineNetBlock(scaled_width(width, self.width_mult),
                         self.crp_stages, self.dtype, name=f'refine{k}')(
                             feat, y)
    logits = layers.conv(self.num_classes, 3, padding=1, dtype=self.dtype,
                         name='classifier')(drop(y))
    logits = layers.resize(logits, in_hw, 'bilinear', align_corners=True)
    return SegmentationOutput(logits=logits.astype(jnp.float32))
