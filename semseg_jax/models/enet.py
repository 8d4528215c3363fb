"""ENet (Paszke, Chaurasia, Kim & Culurciello, arXiv 1606.02147).

A small real-time encoder-decoder: 364,311 parameters at 19 classes (plus
8,352 BatchNorm statistics; the paper says 0.37M). Layer for layer the
network of the authors' Torch code (e-lab/ENet-training, ``models/encoder.lua``
+ ``models/decoder.lua``), which fixes what the paper's Table 1 leaves open:

* **initial block**: a 3x3 stride-2 conv (13 maps, bias) concatenated with a
  2x2 max-pool of the input (3 maps) -> 16 maps, BatchNorm, PReLU.
* **encoder bottleneck** (stages 1-3): main branch = projection (1x1 conv, or
  2x2 stride-2 conv when downsampling; no bias) -> BN -> PReLU -> middle conv
  -> BN -> PReLU -> 1x1 expansion (no bias) -> BN -> spatial dropout; the
  middle conv is a 3x3 conv, a 3x3 conv dilated by 2/4/8/16, or an
  asymmetric pair 1x5 (no bias) then 5x1. Shortcut = identity, 2x2 max-pool
  (whose indices the decoder reuses) and zero channels appended when the
  width grows. Sum, PReLU. The internal width is a quarter of the output's.
* **decoder bottleneck** (stages 4-5): the same with ReLU, no dropout, a
  3x3 stride-2 transposed conv (padding 1, output padding 1) as the middle
  conv when upsampling, and a shortcut 1x1 conv (no bias) -> BN ->
  max-unpooling to the indices of the matching encoder pooling.
* a final 2x2 stride-2 transposed conv ("fullconv", bias) gives the logits.

Stage layout (Table 1): 1.0 down 16->64, 1.1-1.4 (64); 2.0 down 64->128,
2.1 regular, 2.2 dilated 2, 2.3 asymmetric 5, 2.4 dilated 4, 2.5 regular,
2.6 dilated 8, 2.7 asymmetric 5, 2.8 dilated 16; stage 3 = stage 2 without
2.0; 4.0 up 128->64 (indices of 2.0), 4.1, 4.2; 5.0 up 64->16 (indices of
1.0), 5.1; fullconv. Spatial dropout 0.01 in stage 1 and 0.1 afterwards.

BatchNorm uses Torch's epsilon 1e-3 (momentum 0.1, i.e. Flax 0.9). Conv
weights follow Torch's default uniform init ``U(+-1/sqrt(fan_in))``; biases
start at zero. Because the decoder unpools to the encoder's exact sizes,
``H`` and ``W`` must be multiples of 8 (the size rule is checked).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from semseg_jax.models import layers
from semseg_jax.models import register
from semseg_jax.models.output import SegmentationOutput

# Torch7's default for (Full)Convolution weights: U(-1/sqrt(fan_in), +...),
# whose variance is 1 / (3 fan_in).
_TORCH_INIT = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')

# (kind, dilation) of bottlenecks x.1 .. x.8 in stages 2 and 3.
_STAGE23 = (('regular', 1), ('dilated', 2), ('asymmetric', 5), ('dilated', 4),
            ('regular', 1), ('dilated', 8), ('asymmetric', 5), ('dilated', 16))


class PReLU(nn.Module):
  """``torch.nn.PReLU(C)``: one learned negative slope per channel (0.25)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    a = self.param('negative_slope', nn.initializers.constant(0.25),
                   (x.shape[-1],), jnp.float32)
    return jnp.where(x >= 0, x, a.astype(x.dtype) * x)


def _bn(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
  # SpatialBatchNormalization(n, 1e-3) in the authors' code.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-3, dtype=dtype, param_dtype=jnp.float32,
                      name=name)


def _conv(features, kernel_size, strides=1, padding=0, dilation=1,
          use_bias=True, dtype=jnp.float32, name=None) -> nn.Conv:
  return layers.conv(features, kernel_size, strides, padding, dilation,
                     use_bias, dtype, name=name, kernel_init=_TORCH_INIT)


class InitialBlock(nn.Module):
  """``[conv3x3/2 (13 maps), maxpool2x2(x)]`` -> BN -> PReLU."""
  conv_features: int = 13
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    conv = _conv(self.conv_features, 3, 2, 1, dtype=self.dtype,
                 name='conv')(x)
    pool = layers.max_pool(x, 2, 2)
    # Concatenation order of the authors' JoinTable: conv maps first.
    y = jnp.concatenate([conv, pool.astype(conv.dtype)], axis=-1)
    return PReLU(name='prelu')(_bn(train, self.dtype, 'bn')(y))


class EncoderBottleneck(nn.Module):
  """Encoder bottleneck; returns ``(y, pool_indices or None)``.

  Attributes:
    features: output channels (the internal width is ``features // 4``).
    kind: ``'regular'``, ``'downsample'``, ``'dilated'`` or ``'asymmetric'``.
    dilation: the dilation (dilated) or kernel length (asymmetric).
    dropout_rate: spatial dropout (whole channels) at the main branch's end.
    dtype: computation dtype.
  """
  features: int
  kind: str = 'regular'
  dilation: int = 1
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *,
               train: bool) -> tuple[jax.Array, jax.Array | None]:
    internal = self.features // 4
    down = self.kind == 'downsample'
    s = 2 if down else 1
    # Projection: a 2x2 stride-2 conv replaces the 1x1 when downsampling.
    y = _conv(internal, s, s, use_bias=False, dtype=self.dtype,
              name='conv1')(x)
    y = PReLU(name='prelu1')(_bn(train, self.dtype, 'bn1')(y))
    if self.kind in ('regular', 'downsample'):
      y = _conv(internal, 3, padding=1, dtype=self.dtype, name='conv2')(y)
    elif self.kind == 'dilated':
      d = self.dilation
      y = _conv(internal, 3, padding=d, dilation=d, dtype=self.dtype,
                name='conv2')(y)
    elif self.kind == 'asymmetric':
      # Torch's SpatialConvolution(kW=5, kH=1) first: a 1x5 kernel (no
      # bias), then 5x1 (bias), as in the authors' encoder.lua.
      k, p = self.dilation, self.dilation // 2
      y = _conv(internal, (1, k), padding=(0, p), use_bias=False,
                dtype=self.dtype, name='conv2a')(y)
      y = _conv(internal, (k, 1), padding=(p, 0), dtype=self.dtype,
                name='conv2b')(y)
    else:
      raise ValueError(f'enet bottleneck kind must be regular, downsample, '
                       f'dilated or asymmetric, got {self.kind!r}')
    y = PReLU(name='prelu2')(_bn(train, self.dtype, 'bn2')(y))
    y = _conv(self.features, 1, use_bias=False, dtype=self.dtype,
              name='conv3')(y)
    y = _bn(train, self.dtype, 'bn3')(y)
    # Spatial dropout: one Bernoulli draw per (sample, channel).
    y = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2),
                   deterministic=not train)(y)

    indices = None
    shortcut = x
    if down:
      shortcut, indices = layers.max_pool_with_argmax(x, 2, 2)
    extra = self.features - x.shape[-1]
    if extra < 0:
      raise ValueError(f'enet encoder bottleneck cannot shrink {x.shape[-1]} '
                       f'to {self.features} channels')
    # Torch's nn.Padding appends zero channels after the input's.
    shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (0, extra)))
    out = PReLU(name='prelu_out')(y + shortcut.astype(y.dtype))
    return out, indices


class DecoderBottleneck(nn.Module):
  """Decoder bottleneck (ReLU, no dropout).

  With ``indices`` it upsamples x2: the main branch by a transposed conv and
  the shortcut (1x1 conv -> BN) by max-unpooling to ``indices`` at
  ``output_hw``, the input size of the encoder pooling that made them.

  Attributes:
    features: output channels (internal width ``features // 4``).
    dtype: computation dtype.
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, indices: jax.Array | None = None,
               output_hw: tuple[int, int] | None = None, *,
               train: bool) -> jax.Array:
    internal = self.features // 4
    up = indices is not None
    y = _conv(internal, 1, use_bias=False, dtype=self.dtype, name='conv1')(x)
    y = nn.relu(_bn(train, self.dtype, 'bn1')(y))
    if up:
      # SpatialFullConvolution(3, 3, 2, 2, pad 1, adj 1): h -> 2h exactly.
      y = layers.ConvTranspose(internal, 3, 2, padding=1, output_padding=1,
                               kernel_init=_TORCH_INIT, dtype=self.dtype,
                               name='conv2')(y)
    else:
      y = _conv(internal, 3, padding=1, dtype=self.dtype, name='conv2')(y)
    y = nn.relu(_bn(train, self.dtype, 'bn2')(y))
    y = _conv(self.features, 1, use_bias=False, dtype=self.dtype,
              name='conv3')(y)
    y = _bn(train, self.dtype, 'bn3')(y)

    shortcut = x
    if up or x.shape[-1] != self.features:
      shortcut = _conv(self.features, 1, use_bias=False, dtype=self.dtype,
                       name='shortcut_conv')(x)
      shortcut = _bn(train, self.dtype, 'shortcut_bn')(shortcut)
      if up:
        shortcut = layers.max_unpool(shortcut, indices, output_hw, window=2)
    return nn.relu(y + shortcut)


@register('enet')
class ENet(nn.Module):
  """ENet.

  Attributes:
    num_classes: ``K``.
    stage1_dropout_rate: spatial dropout of bottlenecks 1.x (paper: 0.01).
    dropout_rate: spatial dropout of bottlenecks 2.x and 3.x (paper: 0.1).
    dtype: computation dtype; params and BN statistics float32, logits
      float32.
  """
  num_classes: int
  stage1_dropout_rate: float = 0.01
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> SegmentationOutput:
    """``x`` ``[B, H, W, C]`` (``H, W`` multiples of 8) -> logits
    ``[B, H, W, K]`` float32."""
    if x.ndim != 4:
      raise ValueError(f'enet expects NHWC input, got shape {x.shape}')
    h, w = x.shape[1:3]
    if h % 8 or w % 8 or min(h, w) < 8:
      raise ValueError(f'enet needs H and W to be positive multiples of 8 '
                       f'(three stride-2 stages undone by unpooling), got '
                       f'{h}x{w}')
    dt = self.dtype
    x = InitialBlock(dtype=dt, name='initial')(x.astype(dt), train=train)

    enc = lambda f, kind, d, rate, name: EncoderBottleneck(
        f, kind, d, rate, dt, name=name)
    hw1 = x.shape[1:3]
    x, idx1 = enc(64, 'downsample', 1, self.stage1_dropout_rate,
                  'bottleneck1_0')(x, train=train)
    for i in range(1, 5):
      x, _ = enc(64, 'regular', 1, self.stage1_dropout_rate,
                 f'bottleneck1_{i}')(x, train=train)
    hw2 = x.shape[1:3]
    x, idx2 = enc(128, 'downsample', 1, self.dropout_rate,
                  'bottleneck2_0')(x, train=train)
    for stage in (2, 3):
      for i, (kind, d) in enumerate(_STAGE23, start=1):
        x, _ = enc(128, kind, d, self.dropout_rate,
                   f'bottleneck{stage}_{i}')(x, train=train)

    x = DecoderBottleneck(64, dt, name='bottleneck4_0')(x, idx2, hw2,
                                                         train=train)
    for i in (1, 2):
      x = DecoderBottleneck(64, dt, name=f'bottleneck4_{i}')(x, train=train)
    x = DecoderBottleneck(16, dt, name='bottleneck5_0')(x, idx1, hw1,
                                                         train=train)
    x = DecoderBottleneck(16, dt, name='bottleneck5_1')(x, train=train)
    logits = layers.ConvTranspose(self.num_classes, 2, 2,
                                  kernel_init=_TORCH_INIT, dtype=dt,
                                  name='fullconv')(x)
    return SegmentationOutput(logits=logits.astype(jnp.float32))
