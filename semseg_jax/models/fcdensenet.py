"""FC-DenseNet, "The One Hundred Layers Tiramisu" (Jegou et al., arXiv 1611.09326).

A U-shaped network of DenseNet blocks. Every layer of a dense block is
BatchNorm -> ReLU -> 3x3 conv (``growth_rate`` maps) -> Dropout(0.2), and its
output is concatenated to the block's running stack. Down path: a first 3x3
conv (48 maps), then ``n_pool`` times a dense block whose whole stack is kept
as a skip and a *transition down* (BN -> ReLU -> 1x1 conv keeping the width
-> Dropout -> 2x2 max-pool). Bottleneck: a dense block. Up path: ``n_pool``
times a *transition up* (3x3 stride-2 transposed conv of only the maps the
previous block created, concatenated with the skip, as in U-Net) and a dense
block. A 1x1 conv gives the logits from the last stack.

``layers_per_block`` lists the layers of the ``2 * n_pool + 1`` dense blocks
(down..., bottleneck, up...). The paper's networks (CamVid, 11 classes):

==============  ==========================  ======  =====  ==========
name            layers per block            growth  paper  ours (K=11)
==============  ==========================  ======  =====  ==========
fcdensenet56    4 x 11                      12      1.5M   1,376,795
fcdensenet67    5 x 11                      16      3.5M   3,463,243
fcdensenet103   4 5 7 10 12 15 12 10 7 5 4  16      9.4M   9,322,091
==============  ==========================  ======  =====  ==========

"ours" counts trainable parameters; the authors' Lasagne summary also counts
the BatchNorm statistics (+21,168 / +39,680 / +103,072), which gives 3.50M and
9.43M for 67 and 103. The 56 then has 1.40M: the paper's 1.5M does not follow
from the architecture it describes.

Details the paper leaves open follow the authors' Lasagne code
(SimJeg/FC-DenseNet): convolutions have biases and He-uniform weights,
BatchNorm has epsilon 1e-4, dropout is element-wise, and the transposed conv
has no padding (output ``2h + 1``) and is cropped to the skip's size at offset
0 (Lasagne's 'center' crop of a one-pixel excess). Hence any ``H, W >=
2 ** n_pool`` works (odd sizes too); smaller inputs raise a clear error.

The paper uses *batch statistics at test time too* ("contrary to common
practice"); ``batch_stats_at_eval=True`` reproduces that. The default uses
the running averages, so a prediction does not depend on the rest of its
batch.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from semseg_jax.models import layers
from semseg_jax.models import register
from semseg_jax.models.output import SegmentationOutput

# Lasagne's HeUniform(gain='relu'): U(+-sqrt(6 / fan_in)). For the transposed
# conv Lasagne's fan_in is out * k * k, ours in * k * k; the two are equal
# here because a transition up keeps its width.
_HE_UNIFORM = nn.initializers.he_uniform()


class BatchNorm(nn.Module):
  """BatchNorm2d over NHWC with an option to normalise by batch statistics in
  eval mode too (the paper's test protocol).

  Parameters ``scale``/``bias`` and statistics ``mean``/``var`` (biased) have
  ``nn.BatchNorm``'s names. Running averages move only in train mode:
  ``ra = momentum * ra + (1 - momentum) * batch``.

  Attributes:
    momentum: running-average momentum (Lasagne's alpha 0.1 -> 0.9).
    epsilon: added to the variance (Lasagne's default 1e-4).
    batch_stats_at_eval: normalise eval batches by their own statistics.
    dtype: computation dtype; statistics are reduced in float32.
  """
  momentum: float = 0.9
  epsilon: float = 1e-4
  batch_stats_at_eval: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean',
                            lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var',
                           lambda: jnp.ones((c,), jnp.float32))
    if train or self.batch_stats_at_eval:
      xf = x.astype(jnp.float32)
      mean = xf.mean(axis=(0, 1, 2))
      var = jnp.square(xf - mean).mean(axis=(0, 1, 2))
      if train and not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean
        ra_var.value = m * ra_var.value + (1 - m) * var
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    return (x * mul.astype(self.dtype) +
            (bias - mean * mul).astype(self.dtype)).astype(self.dtype)


class BNReLUConv(nn.Module):
  """BN -> ReLU -> ``k x k`` conv (bias, padding 'same') -> Dropout."""
  features: int
  kernel_size: int
  dropout_rate: float
  batch_stats_at_eval: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = BatchNorm(batch_stats_at_eval=self.batch_stats_at_eval,
                  dtype=self.dtype, name='bn')(x, train=train)
    x = layers.conv(self.features, self.kernel_size,
                    padding=self.kernel_size // 2, dtype=self.dtype,
                    kernel_init=_HE_UNIFORM, name='conv')(nn.relu(x))
    # Element-wise dropout, as Lasagne's DropoutLayer (rescaled by 1/(1-p)).
    return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


class DenseBlock(nn.Module):
  """``num_layers`` BN-ReLU-conv3x3-dropout layers, each fed the stack.

  Returns ``(stack, new)``: the input concatenated with every layer's output
  (``C + num_layers * growth_rate`` channels) and the new maps alone.
  """
  num_layers: int
  growth_rate: int
  dropout_rate: float
  batch_stats_at_eval: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *,
               train: bool) -> tuple[jax.Array, jax.Array]:
    new = []
    for j in range(self.num_layers):
      y = BNReLUConv(self.growth_rate, 3, self.dropout_rate,
                     self.batch_stats_at_eval, self.dtype,
                     name=f'layer{j}')(x, train=train)
      new.append(y)
      x = jnp.concatenate([x, y], axis=-1)  # the stack grows: [old, new]
    return x, jnp.concatenate(new, axis=-1)


class TransitionUp(nn.Module):
  """3x3 stride-2 transposed conv of ``x``, cropped to ``skip``, then
  ``[up, skip]`` concatenated (Lasagne's order)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
    # No padding: [h, w] -> [2h + 1, 2w + 1] >= the skip's size (floor
    # pooling made h = skip // 2). The authors crop 'center', which for an
    # excess of one or two pixels is offset 0, i.e. the top-left part.
    up = layers.ConvTranspose(self.features, 3, 2, kernel_init=_HE_UNIFORM,
                              dtype=self.dtype, name='deconv')(x)
    up = up[:, :skip.shape[1], :skip.shape[2]]
    return jnp.concatenate([up, skip.astype(up.dtype)], axis=-1)


class FCDenseNet(nn.Module):
  """FC-DenseNet with a configurable block layout (defaults: FC-DenseNet103).

  Attributes:
    num_classes: ``K``.
    layers_per_block: layers of the ``2 * n_pool + 1`` dense blocks (down
      path, bottleneck, up path); its length sets ``n_pool``.
    growth_rate: maps each dense layer adds (12 or 16 in the paper).
    first_conv_features: maps of the first 3x3 conv (48).
    dropout_rate: dropout after every dense / transition-down conv (0.2).
    batch_stats_at_eval: BatchNorm uses batch statistics in eval mode too,
      as the paper does at test time (default: running averages).
    dtype: computation dtype; params and BN statistics float32, logits
      float32.
  """
  num_classes: int
  layers_per_block: Sequence[int] = (4, 5, 7, 10, 12, 15, 12, 10, 7, 5, 4)
  growth_rate: int = 16
  first_conv_features: int = 48
  dropout_rate: float = 0.2
  batch_stats_at_eval: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> SegmentationOutput:
    """``x`` ``[B, H, W, C]`` -> logits ``[B, H, W, K]`` float32 for any
    ``H, W >= 2 ** n_pool``."""
    blocks = tuple(int(n) for n in self.layers_per_block)
    if len(blocks) < 3 or len(blocks) % 2 == 0 or min(blocks) < 1:
      raise ValueError(f'fcdensenet layers_per_block must list 2 * n_pool + 1 '
                       f'(odd, >= 3) positive counts, got {blocks}')
    n_pool = len(blocks) // 2
    if x.ndim != 4:
      raise ValueError(f'fcdensenet expects NHWC input, got shape {x.shape}')
    h, w = x.shape[1:3]
    if min(h, w) < 2 ** n_pool:
      raise ValueError(f'fcdensenet with {n_pool} poolings needs H, W >= '
                       f'{2 ** n_pool} (2 ** n_pool), got {h}x{w}')
    block = lambda n, name: DenseBlock(n, self.growth_rate, self.dropout_rate,
                                       self.batch_stats_at_eval, self.dtype,
                                       name=name)

    x = layers.conv(self.first_conv_features, 3, padding=1, dtype=self.dtype,
                    kernel_init=_HE_UNIFORM, name='first_conv')(
                        x.astype(self.dtype))
    skips = []
    for i in range(n_pool):
      x, _ = block(blocks[i], f'down_block{i}')(x, train=train)
      skips.append(x)
      x = BNReLUConv(x.shape[-1], 1, self.dropout_rate,
                     self.batch_stats_at_eval, self.dtype,
                     name=f'transition_down{i}')(x, train=train)
      x = layers.max_pool(x, 2, 2)  # floor, as Lasagne's ignore_border
    # Only the maps a block creates are upsampled (not its input): this keeps
    # the up path's width linear in depth.
    _, new = block(blocks[n_pool], 'bottleneck')(x, train=train)
    for i in range(n_pool):
      x = TransitionUp(new.shape[-1], self.dtype,
                       name=f'transition_up{i}')(new, skips[-1 - i])
      x, new = block(blocks[n_pool + 1 + i], f'up_block{i}')(x, train=train)
    # The last block's whole stack (its input included) feeds the classifier.
    logits = layers.conv(self.num_classes, 1, dtype=self.dtype,
                         kernel_init=_HE_UNIFORM, name='classifier')(x)
    return SegmentationOutput(logits=logits.astype(jnp.float32))


@register('fcdensenet103')
class FCDenseNet103(FCDenseNet):
  """FC-DenseNet103: blocks 4 5 7 10 12 15 12 10 7 5 4, growth 16 (9.4M)."""
  layers_per_block: Sequence[int] = (4, 5, 7, 10, 12, 15, 12, 10, 7, 5, 4)
  growth_rate: int = 16


@register('fcdensenet67')
class FCDenseNet67(FCDenseNet):
  """FC-DenseNet67: 5 layers in each of 11 blocks, growth 16 (3.5M)."""
  layers_per_block: Sequence[int] = (5,) * 11
  growth_rate: int = 16


@register('fcdensenet56')
class FCDenseNet56(FCDenseNet):
  """FC-DenseNet56: 4 layers in each of 11 blocks, growth 12 (1.5M)."""
  layers_per_block: Sequence[int] = (4,) * 11
  growth_rate: int = 12
