"""Full-Resolution Residual Networks FRRN A and B (Pohlen et al., CVPR 2017).

Two streams run side by side. The *residual stream* ``z`` (32 channels) stays
at the input resolution; the *pooling stream* ``y`` is max-pooled stage by
stage and upsampled again. They meet in full-resolution residual units
(FRRUs): an FRRU at scale ``s`` concatenates ``y`` with ``z`` max-pooled by
``s``, applies two 3x3 conv -> norm -> ReLU (the new ``y``), and adds a 1x1
conv of it, nearest-upsampled by ``s``, to ``z``.

Layer for layer as pytorch-semseg's ``ptsemseg/models/frrn.py``:
``conv1`` (5x5, 48, with bias) -> norm -> ReLU, three residual units (RU:
conv -> norm -> ReLU -> conv -> norm, plus the input; no activation after
the sum),
``split_conv`` (1x1, 48 -> 32, no bias, no norm) starts ``z``; encoder
stages pool ``y`` by 2 and run ``n`` FRRUs, decoder stages upsample ``y`` x2
(bilinear, corner aligned) and run ``n`` FRRUs; then ``y`` upsampled x2 is
concatenated with ``z``, ``merge_conv`` (1x1 -> 48, no bias), three RUs and
``classif_conv`` (1x1 -> K, with bias). Stages ``(n, channels, scale)``:

* A: encoder (3, 96, 2) (4, 192, 4) (2, 384, 8) (2, 384, 16); decoder
  (2, 192, 8) (2, 192, 4) (2, 48, 2).
* B: encoder adds (2, 384, 32) and the decoder (2, 192, 16) in front.

Upstream quirks and how they are kept:

* ``frrnA`` builds B upstream: ``ptsemseg.models.get_model`` never passes the
  config's model type, so ``frrn(n_classes)`` falls back to
  ``model_type="B"``. Here ``frrnA`` is A (16,559,173 parameters at K=21,
  counted on upstream's ``frrn(21, model_type="A")``) and ``frrnB`` is B
  (23,568,069).
* Upstream feeds *every* FRRU of a stage the same pooled (or upsampled)
  input and keeps only the last block's ``y``; only ``z`` is chained, and
  each block's first conv takes ``prev_channels + 32`` inputs.
  ``share_pooled_input=True`` reproduces that (the converter builds it, and
  only then do parameter counts equal upstream's). The default chains ``y``
  from block to block as the paper and the authors' Theano code do, so a
  stage's second and later blocks take ``channels + 32`` inputs.
* The authors' last decoder stage of A has 96 channels (``base * 2``);
  upstream has 48. Their split conv also has a BatchNorm and their merge is
  a residual unit with a 1x1 projection. We keep upstream's layers.
* Upstream only runs when ``H`` and ``W`` are multiples of the deepest scale
  (16 for A, 32 for B): otherwise the upsampled residual misses ``z``'s size.
  Here pooling rounds up (ceil mode) and every upsampled map is cropped or
  resized to the size of the stream it joins, so any ``H, W >= 1`` works;
  on upstream's sizes this is exactly upstream's computation.

``group_norm=True`` replaces every BatchNorm by GroupNorm with ``n_groups``
groups (epsilon 1e-5 as torch), upstream's option; parameter counts are
unchanged.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from semseg_jax.models import layers
from semseg_jax.models import register
from semseg_jax.models.backbones.vgg import scaled_width
from semseg_jax.models.output import SegmentationOutput

# Stage specs (n_blocks, channels, scale) at width_mult=1, upstream's table.
SPECS = {
    'A': {'encoder': ((3, 96, 2), (4, 192, 4), (2, 384, 8), (2, 384, 16)),
          'decoder': ((2, 192, 8), (2, 192, 4), (2, 48, 2))},
    'B': {'encoder': ((3, 96, 2), (4, 192, 4), (2, 384, 8), (2, 384, 16),
                      (2, 384, 32)),
          'decoder': ((2, 192, 16), (2, 192, 8), (2, 192, 4), (2, 48, 2))},
}
BASE_CHANNELS = 48  # conv1, the RUs and merge_conv.
LANES = 32  # channels of the residual stream.


class ConvNormAct(nn.Module):
  """Conv -> BatchNorm (``bn``) or GroupNorm (``gn``) -> optional ReLU.

  Upstream's ``conv2DBatchNormRelu`` / ``conv2DGroupNormRelu`` (and their
  ReLU-free variants); the conv is named ``conv``. Only ``conv1`` of the
  network keeps a bias before its norm, as upstream.
  """
  features: int
  kernel_size: int
  group_norm: bool
  n_groups: int
  act: bool = True
  use_bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = layers.conv(self.features, self.kernel_size,
                    padding=self.kernel_size // 2, use_bias=self.use_bias,
                    dtype=self.dtype, name='conv')(x)
    if self.group_norm:
      if self.features % self.n_groups:
        raise ValueError(f'frrn: n_groups={self.n_groups} must divide every '
                         f'normalised width; {self.features} is not a '
                         'multiple')
      x = nn.GroupNorm(num_groups=self.n_groups, epsilon=1e-5,
                       use_fast_variance=False, dtype=self.dtype,
                       param_dtype=jnp.float32, name='gn')(x)
    else:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                       epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32,
                       name='bn')(x)
    return nn.relu(x) if self.act else x


class RU(nn.Module):
  """Residual unit: ``x + norm(conv(relu(norm(conv(x)))))``, no final ReLU."""
  group_norm: bool
  n_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    c = x.shape[-1]
    h = ConvNormAct(c, 3, self.group_norm, self.n_groups, dtype=self.dtype,
                    name='conv1')(x, train=train)
    h = ConvNormAct(c, 3, self.group_norm, self.n_groups, act=False,
                    dtype=self.dtype, name='conv2')(h, train=train)
    return h + x


class FRRU(nn.Module):
  """Full-resolution residual unit at pooling scale ``scale``.

  ``y`` ``[B, ceil(H/s), ceil(W/s), C]`` and ``z`` ``[B, H, W, lanes]`` ->
  ``(y', z')`` with ``y'`` ``[B, ceil(H/s), ceil(W/s), features]`` and ``z'``
  like ``z``.
  """
  features: int
  scale: int
  group_norm: bool
  n_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, y: jax.Array, z: jax.Array, *,
               train: bool) -> tuple[jax.Array, jax.Array]:
    s = self.scale
    h, w = z.shape[1:3]
    zp = layers.max_pool(z, s, s, ceil_mode=True)
    x = jnp.concatenate([y, zp.astype(y.dtype)], axis=-1)
    y = ConvNormAct(self.features, 3, self.group_norm, self.n_groups,
                    dtype=self.dtype, name='conv1')(x, train=train)
    y = ConvNormAct(self.features, 3, self.group_norm, self.n_groups,
                    dtype=self.dtype, name='conv2')(y, train=train)
    r = layers.conv(z.shape[-1], 1, dtype=self.dtype, name='conv_res')(y)
    # Nearest upsampling by an integer factor repeats each value; the crop
    # drops what ceil pooling added beyond z's size (none on upstream sizes).
    r = jnp.repeat(jnp.repeat(r, s, axis=1), s, axis=2)[:, :h, :w]
    return y, z + r.astype(z.dtype)


class FRRN(nn.Module):
  """Shared FRRN body; :class:`FRRNA` and :class:`FRRNB` fix the stages.

  Attributes:
    num_classes: ``K``.
    group_norm: GroupNorm instead of BatchNorm everywhere (upstream option).
    n_groups: GroupNorm groups (upstream default 16).
    share_pooled_input: upstream's wiring, every FRRU of a stage reads the
      stage's pooled input (parity); ``False`` chains them (paper).
    width_mult: scales every width, including the residual stream's 32
      (1.0 = the paper's network; e.g. 1/8 for tests).
    dtype: computation dtype; params (and BN statistics) float32, logits
      float32.
  """
  num_classes: int
  group_norm: bool = False
  n_groups: int = 16
  share_pooled_input: bool = False
  width_mult: float = 1.0
  dtype: Any = jnp.float32

  model_type: ClassVar[str] = 'B'

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> SegmentationOutput:
    """``x`` ``[B, H, W, 3]`` -> logits ``[B, H, W, K]`` float32, any H, W."""
    if x.ndim != 4:
      raise ValueError(f'frrn expects NHWC input, got shape {x.shape}')
    spec = SPECS[self.model_type]
    width = lambda c: scaled_width(c, self.width_mult)
    norm = dict(group_norm=self.group_norm, n_groups=self.n_groups,
                dtype=self.dtype)
    base = width(BASE_CHANNELS)
    in_hw = x.shape[1:3]

    def size_at(s):  # pooling-stream size at scale s (ceil pooling)
      return tuple(math.ceil(n / s) for n in in_hw)

    x = x.astype(self.dtype)
    x = ConvNormAct(base, 5, **norm, use_bias=True, name='conv1')(
        x, train=train)
    for i in range(3):
      x = RU(**norm, name=f'in_ru{i}')(x, train=train)
    y = x
    z = layers.conv(width(LANES), 1, use_bias=False, dtype=self.dtype,
                    name='split_conv')(x)

    for stage, (n, c, s) in enumerate(spec['encoder']):
      stage_in = layers.max_pool(y, 2, 2, ceil_mode=True)
      y = stage_in
      for b in range(n):
        block_in = stage_in if self.share_pooled_input else y
        y, z = FRRU(width(c), s, **norm, name=f'enc{stage}_{b}')(
            block_in, z, train=train)

    for stage, (n, c, s) in enumerate(spec['decoder']):
      # Upstream: x2 corner-aligned bilinear; the target is the size of the
      # stage's stream, which is 2x unless ceil pooling rounded up.
      stage_in = layers.resize(y, size_at(s), 'bilinear', align_corners=True)
      y = stage_in
      for b in range(n):
        block_in = stage_in if self.share_pooled_input else y
        y, z = FRRU(width(c), s, **norm, name=f'dec{stage}_{b}')(
            block_in, z, train=train)

    y = layers.resize(y, in_hw, 'bilinear', align_corners=True)
    x = jnp.concatenate([y, z.astype(y.dtype)], axis=-1)
    x = layers.conv(base, 1, use_bias=False, dtype=self.dtype,
                    name='merge_conv')(x)
    for i in range(3):
      x = RU(**norm, name=f'out_ru{i}')(x, train=train)
    logits = layers.conv(self.num_classes, 1, dtype=self.dtype,
                         name='classif_conv')(x)
    return SegmentationOutput(logits=logits.astype(jnp.float32))


@register('frrnA')
class FRRNA(FRRN):
  """FRRN A (the paper's quarter-resolution network)."""
  model_type: ClassVar[str] = 'A'


@register('frrnB')
class FRRNB(FRRN):
  """FRRN B (one more pooling level, 32x; half-resolution network)."""
  model_type: ClassVar[str] = 'B'
