"""G-FRNet: Gated Feedback Refinement Network (Islam et al., CVPR 2017).

A VGG16 encoder makes a coarse prediction at 1/32 resolution, which five
gated refinement stages sharpen back to the input resolution. Each stage
gates a shallow encoder feature with the next deeper one (element-wise
product, so a deep, more discriminative feature can switch off ambiguous
shallow activations) and refines the upsampled coarser prediction with the
result. Every stage's prediction is supervised (stage-wise deep supervision).

Layer for layer this follows the authors' released Caffe network
(github.com/mrochan/gfrnet, ``models/camvid/train_camvid_gate.prototxt``):

* Encoder: VGG16's 13 convolutions, each 3x3 conv -> BatchNorm -> ReLU, 2x2
  max-pools that round sizes up (Caffe pooling; 360x480 gives 180x240,
  90x120, 45x60, 23x30, 12x15), dropout 0.5 after pool3, pool4 and pool5,
  then ``conv6`` and ``conv7`` (3x3, 1024 channels, BatchNorm, ReLU, dropout
  0.5). ``pred_1`` (3x3 conv to K channels) on ``conv7`` is the coarse
  prediction.
* Stages s2..s6 gate (deep, shallow) = (pool5, conv5_3), (conv5_3, conv4_3),
  (conv4_3, conv3_3), (conv3_3, conv2_2), (conv2_2, conv1_2); each predicts
  at the shallow feature's size: 1/16, 1/8, 1/4, 1/2, 1/1.
* Upsampling is Caffe's ``Interp`` layer: bilinear with aligned corners, to
  the exact size of the feature it meets.

``variant`` picks the gate and refinement units:

* ``'caffe'`` (default; the network behind the paper's reported numbers):
  every gated encoder feature is projected once to K channels by a 3x3 conv
  + BatchNorm (no ReLU; ``pool5`` gets a plain 3x3 conv) and that projection
  serves both gates it takes part in (as the shallow input of one stage and,
  upsampled, as the deep input of the next). Gate ``G = BN(u * up(v))``;
  the refinement unit is one 3x3 conv on ``concat[G, up(R)]`` to K channels.
* ``'paper'``: the units as the paper's text describes them (its gate and
  refinement-unit figures): the gate transforms both inputs with its own
  3x3 conv + BN + ReLU (to the shallow feature's channel count, our choice
  of width), ``M = u * up(v)``; the refinement unit reduces ``M`` to K
  channels (3x3 conv + BN) so that it cannot swamp the K-channel coarse
  map, concatenates ``[m, up(R)]`` and applies a 3x3 conv.

Outputs: ``logits`` are the finest prediction ``[B, H, W, K]`` (any H, W >= 1:
the ceil-mode pools never run out of pixels). In train mode ``aux`` holds the
five coarser predictions at their own resolutions, coarse to fine (1/32,
1/16, 1/8, 1/4, 1/2; the prototxt's losses l1..l5); the loss upsamples them
to the label size with aligned-corner bilinear interpolation, exactly as the
prototxt's ``pred_k_u`` layers do before their ``SoftmaxWithLoss``. The
released net weighs all six losses 1 (``config.loss.aux_weights``).

Parameters (K classes, ``width_mult=1``, ``encoder_norm``): 'caffe'
28,885,056 + 27,104 K + 90 K^2 (29,194,090 at K=11 for CamVid, 29,493,930
at K=21 for VOC); 'paper' 40,653,504 + 22,485 K + 90 K^2 (40,911,729 at
K=11). Without ``encoder_norm`` both lose the encoder's 12,544 BN
parameters. Forward cost at CamVid's 360x480 (K=11, XLA cost analysis):
'caffe' 114.1 GFLOPs, 'paper' 190.4 GFLOPs. The paper gives no parameter
count.
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

_VARIANTS = ('caffe', 'paper')
# VGG16 blocks: (block, number of 3x3 convs, channels at width_mult=1).
_BLOCKS = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))
# Refinement stages as the prototxt names them: (stage, deep, shallow).
_STAGES = (('s2', 'pool5', 'conv5_3'), ('s3', 'conv5_3', 'conv4_3'),
           ('s4', 'conv4_3', 'conv3_3'), ('s5', 'conv3_3', 'conv2_2'),
           ('s6', 'conv2_2', 'conv1_2'))


def _batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
  """BatchNorm with ConvBNAct's PyTorch settings (momentum 0.1, eps 1e-5)."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32,
                      name=name)


def _upsample(x: jax.Array, like: jax.Array) -> jax.Array:
  """Caffe ``Interp`` (bilinear, aligned corners) to ``like``'s H, W."""
  return layers.resize(x, like.shape[1:3], 'bilinear', align_corners=True)


class GFRNetEncoder(nn.Module):
  """VGG16 with BatchNorm and dropout, plus conv6/conv7, as G-FRNet's.

  The shared ``backbones.VGG16`` has no BatchNorm and returns only the
  pooled maps; the gates need the pre-pool ``conv{b}_{last}`` maps, hence
  this encoder (same parameter names ``conv{b}_{i}``, as ConvBNAct).

  Attributes:
    width_mult: scales every channel count (64 ... 1024).
    norm: BatchNorm after every conv (the released net; False gives plain
      VGG16 convolutions, e.g. to start from ImageNet VGG16 weights).
    dropout_rate: element-wise dropout (Caffe ``Dropout``) after pool3,
      pool4, pool5, conv6 and conv7.
    dtype: computation dtype.
  """
  width_mult: float = 1.0
  norm: bool = True
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """``x`` ``[B, H, W, C]`` -> ``conv1_2``, ``conv2_2``, ``conv3_3``,
    ``conv4_3``, ``conv5_3`` (post-ReLU, before pooling; sizes ``H_1 = H``,
    ``H_b = ceil(H_{b-1} / 2)``), ``pool5`` and ``conv7`` (``ceil(H_5 / 2)``;
    after dropout)."""

    def conv_bn_relu(h, channels, name):
      return layers.ConvBNAct(scaled_width(channels, self.width_mult), 3,
                              padding=1, norm=self.norm, dtype=self.dtype,
                              name=name)(h, train=train)

    def drop(h):
      return nn.Dropout(self.dropout_rate, deterministic=not train)(h)

    feats = {}
    h = x.astype(self.dtype)
    for block, n_convs, channels in _BLOCKS:
      for i in range(1, n_convs + 1):
        h = conv_bn_relu(h, channels, f'conv{block}_{i}')
      feats[f'conv{block}_{n_convs}'] = h
      # Caffe pooling rounds the output size up (23 -> 12 on CamVid).
      h = layers.max_pool(h, 2, 2, ceil_mode=True)
      if block >= 3:
        # The prototxt's in-place encdrop3..5: the gates read conv{b}_3
        # before pooling (undropped) but pool5 after dropout.
        h = drop(h)
    feats['pool5'] = h
    # conv6/conv7 replace VGG's fc6/fc7 by 3x3 convolutions (prototxt).
    h = drop(conv_bn_relu(h, 1024, 'conv6'))
    feats['conv7'] = drop(conv_bn_relu(h, 1024, 'conv7'))
    return feats


@register('gfrnet')
class GFRNet(nn.Module):
  """G-FRNet with a VGG16 encoder.

  Attributes:
    num_classes: ``K``; every decoder map has K channels.
    variant: ``'caffe'`` (the authors' released network) or ``'paper'``
      (the units as the paper's text describes them); see the module doc.
    width_mult: scales the encoder widths (1.0 = VGG16; e.g. 1/16 for tests).
    encoder_norm: BatchNorm after each encoder conv (released net: True).
    dropout_rate: encoder dropout rate (released net: 0.5).
    dtype: computation dtype; params float32, logits float32.
  """
  num_classes: int
  variant: str = 'caffe'
  width_mult: float = 1.0
  encoder_norm: bool = True
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> SegmentationOutput:
    """``x`` ``[B, H, W, C]`` (any H, W >= 1) -> logits ``[B, H, W, K]``
    float32; with ``train`` also ``aux``: five float32 predictions
    ``[B, h_s, w_s, K]`` at 1/32, 1/16, 1/8, 1/4 and 1/2 resolution
    (ceil-rounded), coarse to fine."""
    if self.variant not in _VARIANTS:
      raise ValueError(f'gfrnet variant must be one of {_VARIANTS}, '
                       f'got {self.variant!r}')
    if x.ndim != 4:
      raise ValueError(f'gfrnet expects NHWC input, got shape {x.shape}')
    k = self.num_classes
    caffe = self.variant == 'caffe'
    feats = GFRNetEncoder(self.width_mult, self.encoder_norm,
                          self.dropout_rate, self.dtype,
                          name='encoder')(x, train=train)

    def conv(features, name):  # every decoder conv is 3x3, padding 1
      return layers.conv(features, 3, padding=1, dtype=self.dtype, name=name)

    def conv_bn(h, features, name, act=None):
      return layers.ConvBNAct(features, 3, padding=1, act=act,
                              dtype=self.dtype, name=name)(h, train=train)

    pred = conv(k, 'pred_1')(feats['conv7'])  # coarse prediction, 1/32
    preds = [pred]
    # caffe: K-channel projection of each gated encoder feature, shared by
    # the two stages that use it. pool5's has no BatchNorm in the prototxt.
    proj = {'pool5': conv(k, 'pool5_feature')(feats['pool5'])} if caffe else {}
    for stage, deep, shallow in _STAGES:
      f = feats[shallow]
      if caffe:
        proj[shallow] = conv_bn(f, k, f'{shallow}_feature')
        gated = proj[shallow] * _upsample(proj[deep], f)
        gated = _batch_norm(train, self.dtype, f'gate_{stage}_bn')(gated)
      else:
        # Gate unit: T_f = 3x3 conv + BN + ReLU on both inputs (paper). Its
        # width is our choice: the shallow feature's channels, so the deep
        # input is brought to the shallow one's width before the product.
        c = f.shape[-1]
        v = conv_bn(feats[deep], c, f'gate_{stage}_deep', nn.relu)
        u = conv_bn(f, c, f'gate_{stage}_shallow', nn.relu)
        # Refinement unit: m_f = BN(conv3x3(M_f)) with K channels, as many
        # as the coarse map R_f it is concatenated with.
        gated = conv_bn(u * _upsample(v, u), k, f'ru_{stage}_reduce')
      coarse = _upsample(pred, f).astype(gated.dtype)
      # The prototxt concatenates [gate, prediction] except at stage s5,
      # where it is [prediction, gate]; kept so that released weights fit.
      parts = [coarse, gated] if caffe and stage == 's5' else [gated, coarse]
      name = 'prediction' if stage == 's6' else f'pred_{len(preds) + 1}'
      pred = conv(k, name)(jnp.concatenate(parts, axis=-1))
      preds.append(pred)

    aux = tuple(p.astype(jnp.float32) for p in preds[:-1]) if train else ()
    return SegmentationOutput(logits=preds[-1].astype(jnp.float32), aux=aux)
