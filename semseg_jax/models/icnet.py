"""ICNet: Image Cascade Network (Zhao et al., ECCV 2018), and ICNet-BN.

Layer for layer pytorch-semseg's ``ptsemseg/models/icnet.py`` (the authors'
Caffe network at half width): three branches see the image at three scales.

* sub4 / sub2 (shared trunk): the input bilinearly resized to about 1/2
  (``align_corners=True``), a deep stem (32, 32, 64) and the first two
  stages of a ResNet-50 to 1/16 (``res_block2``, ``res_block3_conv``) — the
  *sub2* features; resized again to 1/32, the rest of stage 3
  (``res_block3_identity``), dilated stages 4 and 5, pyramid pooling summed
  into its input and ``conv5_4_k1`` (1x1 to 256) — the *sub4* features.
* sub1: three strided 3x3 convs on the full image (1/8, 64 channels).
* two cascade feature fusion units (CFF): the coarser map is upsampled x2
  (``align_corners=True``), a dilated 3x3 conv-BN projects it, a 1x1 conv-BN
  projects the finer map, their sum goes through ReLU; a 1x1 classifier on
  the upsampled coarse map gives that scale's auxiliary logits.
* the fused 1/8 map is upsampled x2, classified (1/4) and resized to the
  input.

Output: ``logits`` at the input resolution; in training also ``aux =
(sub24 logits at 1/8, sub4 logits at 1/16)``. With ``config.loss.aux_weights
= (0.4, 0.16)`` the loss is upstream's ``multi_scale_cross_entropy2d``
(weights 0.4**i on (1/4, 1/8, 1/16) logits, each upsampled to the labels
with ``align_corners=True``): our main logits are the 1/4 logits resized
the same way.

Names: ``icnet`` has no BatchNorm (biased convs; the released Caffe models
with BN folded into the convs), ``icnetBN`` has it (upstream's
``is_batchnorm`` option; its registry maps both names to one class).

Upstream quirks, each kept behind an option (the converter's parity mode):

* ``pool_mode='upstream'``: in evaluation upstream pools with windows
  hard-coded for a 1025x2049 input (a 33x65 map: kernels (8, 15), (13, 25),
  (17, 33), (33, 65), strides (5, 10), (10, 20), (16, 32), (33, 65)); in
  training with ``kernel = stride = int(n / bin)`` (``'floor'``). The
  default ``'adaptive'`` works at any size.
* ``unused_pool_convs=True`` (default, for upstream's parameter count and
  state dict): upstream builds a 1x1 conv(-BN) per pyramid bin but never
  applies it (the paper's ICNet sums the pooled maps directly); ours are
  created at init and never applied either. ``False`` drops these
  1,049,600 (icnet) / 1,050,624 (icnetBN) dead parameters.
* ``repeat_res3_identity=True``: upstream runs ``res_block3_identity`` a
  second time on the sub4 features after the fusion and discards the
  result, which in training updates that stage's BatchNorm running
  statistics a second time with unrelated features.

Sizes: upstream computes every resize as Caffe's ``interp`` (shrink to
``(n - 1) / 2 + 1``, zoom to ``(n - 1) * 2 + 1``) and only works when these
line up, i.e. for ``H, W = 32k + 1`` (1025 x 2049). Here each CFF resizes
the coarse map to the fine map's size and the logits to the input size,
which is the same computation at ``32k + 1`` sizes and works at any size.

Parameter counts equal upstream's: icnet 7,742,649 / icnetBN 7,757,945 at 19
classes (upstream's default), 7,743,679 / 7,758,975 at 21.
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

POOL_MODES = ('adaptive', 'floor', 'upstream')
# Upstream's evaluation-time pyramid pooling for a 1025x2049 input (33x65 map
# at 1/32), bins (6, 3, 2, 1): ((kernel_h, kernel_w), (stride_h, stride_w)).
UPSTREAM_EVAL_WINDOWS = (((8, 15), (5, 10)), ((13, 25), (10, 20)),
                         ((17, 33), (16, 32)), ((33, 65), (33, 65)))


def shrink_size(n: int) -> int:
  """Caffe ``interp`` shrink by 2 (upstream's ``get_interp_size``)."""
  return int((n - 1) / 2 + 1)


def zoom_size(n: int) -> int:
  """Caffe ``interp`` zoom by 2: ``(n - 1) * 2 + 1``."""
  return (n - 1) * 2 + 1


def _resize(x: jax.Array, hw) -> jax.Array:
  return layers.resize(x, hw, 'bilinear', align_corners=True)


class CascadeFeatureFusion(nn.Module):
  """CFF unit (ICNet paper, Fig. 3).

  Attributes:
    num_classes: ``K`` of the auxiliary classifier.
    features: output channels (128).
    norm: BatchNorm (else biased convs).
    dtype: computation dtype.
  """
  num_classes: int
  features: int
  norm: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, low: jax.Array, high: jax.Array, *, train: bool,
               classify: bool) -> tuple[jax.Array, jax.Array | None]:
    """``low`` ``[B, h, w, C1]`` (coarse), ``high`` ``[B, H, W, C2]``
    (fine, ``H ~ 2h``) -> (``[B, H, W, features]``, auxiliary logits
    ``[B, H, W, K]`` or ``None`` unless ``classify``)."""
    cb = functools.partial(layers.ConvBNAct, use_bias=not self.norm,
                           norm=self.norm, act=None, dtype=self.dtype)
    low = _resize(low, high.shape[1:3])
    cls = None
    if classify:
      cls = layers.conv(self.num_classes, 1, dtype=self.dtype,
                        name='low_classifier_conv')(low)
    low = cb(self.features, 3, padding=2, dilation=2,
             name='low_dilated_conv_bn')(low, train=train)
    high = cb(self.features, 1, name='high_proj_conv_bn')(high, train=train)
    return nn.relu(low + high), cls


@register('icnet')
class ICNet(nn.Module):
  """ICNet (module doc); ``icnet`` has no BatchNorm, ``icnetBN`` has.

  Attributes:
    num_classes: ``K``.
    is_batchnorm: BatchNorm after every conv (else biased convs).
    block_config: blocks per ResNet stage (ResNet-50: (3, 4, 6, 3)).
    bins: pyramid pooling levels.
    pool_mode: ``'adaptive'`` (default), ``'floor'`` or ``'upstream'``.
    unused_pool_convs: create upstream's never-applied pyramid convs.
    repeat_res3_identity: upstream's second, discarded ``res_block3_identity``
      pass (affects BatchNorm statistics in training only).
    width_mult: scales every channel count (1.0 = the paper's network).
    dtype: computation dtype; params, BatchNorm statistics and logits
      float32.
  """
  num_classes: int
  is_batchnorm: bool = False
  block_config: Sequence[int] = (3, 4, 6, 3)
  bins: Sequence[int] = (6, 3, 2, 1)
  pool_mode: str = 'adaptive'
  unused_pool_convs: bool = True
  repeat_res3_identity: bool = False
  width_mult: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> SegmentationOutput:
    """``x`` ``[B, H, W, 3]`` -> logits ``[B, H, W, K]`` float32; in
    training ``aux = (sub24 [~H/8, ~W/8], sub4 [~H/16, ~W/16])`` logits."""
    if x.ndim != 4:
      raise ValueError(f'ICNet expects NHWC input, got shape {x.shape}')
    if self.pool_mode not in POOL_MODES:
      raise ValueError(f'pool_mode must be one of {POOL_MODES}, got '
                       f'{self.pool_mode!r}')
    if len(self.block_config) != 4:
      raise ValueError('block_config must give 4 stages, got '
                       f'{tuple(self.block_config)}')
    windows = None
    pool_mode = self.pool_mode
    if pool_mode == 'upstream':
      if tuple(self.bins) != (6, 3, 2, 1):
        raise ValueError("pool_mode='upstream' has windows for bins "
                         f'(6, 3, 2, 1) only, got {tuple(self.bins)}')
      pool_mode = 'floor'
      # Not at init: parameters do not depend on the pooling, and the
      # trainer initialises at its (smaller) crop size.
      if not train and not self.is_initializing():
        windows = UPSTREAM_EVAL_WINDOWS
    norm = self.is_batchnorm
    wd = functools.partial(scaled_width, width_mult=self.width_mult)
    stage = functools.partial(ResidualStage, norm=norm, dtype=self.dtype)
    cbr = functools.partial(layers.ConvBNAct, use_bias=not norm, norm=norm,
                            dtype=self.dtype)
    classify = train or self.is_initializing()  # aux heads: upstream params
    h, w = x.shape[1:3]
    x = x.astype(self.dtype)
    b = self.block_config

    # sub2: 1/2 input -> 1/16 features.
    x_sub2 = _resize(x, (shrink_size(h), shrink_size(w)))
    x_sub2 = DeepStem((wd(32), wd(32), wd(64)), norm=norm, dtype=self.dtype,
                      name='stem')(x_sub2, train=train)
    x_sub2 = stage(b[0], wd(32), wd(128), name='res_block2')(x_sub2,
                                                             train=train)
    x_sub2 = stage(b[1], wd(64), wd(256), strides=2, include='conv',
                   name='res_block3_conv')(x_sub2, train=train)
    # sub4: -> 1/32.
    res3_identity = stage(b[1], wd(64), wd(256), strides=2,
                          include='identity', name='res_block3_identity')
    x_sub4 = _resize(x_sub2, tuple(shrink_size(n) for n in x_sub2.shape[1:3]))
    x_sub4 = res3_identity(x_sub4, train=train)
    x_sub4 = stage(b[2], wd(128), wd(512), dilation=2,
                   name='res_block4')(x_sub4, train=train)
    x_sub4 = stage(b[3], wd(256), wd(1024), dilation=4,
                   name='res_block5')(x_sub4, train=train)
    if windows is not None and (x_sub4.shape[1] < 33 or x_sub4.shape[2] < 65):
      raise ValueError(
          "pool_mode='upstream' evaluates with upstream's pooling windows for "
          '1025x2049 inputs, which need a map of at least 33x65 at 1/32; got '
          f'{x_sub4.shape[1]}x{x_sub4.shape[2]} for a {h}x{w} input (use '
          "pool_mode='floor' or 'adaptive')")
    x_sub4 = PyramidPooling(
        tuple(self.bins), 'sum', pool_mode,
        'unused' if self.unused_pool_convs else 'none',
        'batch' if norm else 'none', self.dtype,
        name='pyramid_pooling')(x_sub4, train=train, windows=windows)
    x_sub4 = cbr(wd(256), 1, name='conv5_4_k1')(x_sub4, train=train)

    # sub1: full input -> 1/8.
    x_sub1 = x
    for i, c in enumerate((wd(32), wd(32), wd(64)), start=1):
      x_sub1 = cbr(c, 3, strides=2, padding=1,
                   name=f'convbnrelu{i}_sub1')(x_sub1, train=train)

    x_sub24, sub4_cls = CascadeFeatureFusion(
        self.num_classes, wd(128), norm, self.dtype, name='cff_sub24')(
            x_sub4, x_sub2, train=train, classify=classify)
    x_sub12, sub24_cls = CascadeFeatureFusion(
        self.num_classes, wd(128), norm, self.dtype, name='cff_sub12')(
            x_sub24, x_sub1, train=train, classify=classify)
    if self.repeat_res3_identity and train:
      res3_identity(x_sub4, train=train)  # upstream's discarded pass

    x_sub12 = _resize(x_sub12, tuple(zoom_size(n) for n in x_sub12.shape[1:3]))
    sub124_cls = layers.conv(self.num_classes, 1, dtype=self.dtype,
                             name='classification')(x_sub12)
    # Upstream: eval zooms x4 ((n - 1) * 4 + 1 = H at H = 32k + 1); its
    # training loss resizes the 1/4 logits to the labels. Both = this.
    logits = _resize(sub124_cls.astype(jnp.float32), (h, w))
    aux = ()
    if train:
      aux = (sub24_cls.astype(jnp.float32), sub4_cls.astype(jnp.float32))
    return SegmentationOutput(logits=logits, aux=aux)


@register('icnetBN')
class ICNetBN(ICNet):
  """ICNet with BatchNorm (upstream ``icnet(is_batchnorm=True)``)."""
  is_batchnorm: bool = True
