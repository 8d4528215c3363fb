"""VGG16 convolutional trunk, as FCN (and pytorch-semseg) uses it.

Five blocks of 3x3 convolutions (2, 2, 3, 3, 3 of them, padding 1, ReLU), each
followed by a 2x2 stride-2 max-pool with ``ceil_mode=True``. FCN pads the very
first convolution by 100 pixels so that its valid 7x7 ``fc6`` and the crops of
the skip branches fit any input size; ``conv1_padding`` keeps that choice
explicit. fc6/fc7 belong to the FCN classifier, not here.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from semseg_jax.models import layers

# (block, number of convs, channels at width_mult=1).
_BLOCKS = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))


def scaled_width(channels: int, width_mult: float) -> int:
  """``channels * width_mult`` rounded, at least 1."""
  return max(1, int(round(channels * width_mult)))


class VGG16(nn.Module):
  """VGG16 feature trunk.

  Attributes:
    width_mult: scales every channel count (1.0 = VGG16; e.g. 1/16 for
      tests).
    conv1_padding: padding of ``conv1_1`` (100 for FCN, 1 for plain VGG).
    dtype: computation dtype; params stay float32.
    remat: rematerialise each block's activations in the backward pass
      (``jax.checkpoint`` per block; same parameters and values, less
      memory, about one more forward of compute).

  Params are named ``conv{block}_{i}`` (``conv1_1`` ... ``conv5_3``).
  """
  width_mult: float = 1.0
  conv1_padding: int = 100
  dtype: Any = jnp.float32
  remat: bool = False

  def _block(self, h: jax.Array, block: int, n_convs: int,
             width: int) -> jax.Array:
    """Block ``block``: ``n_convs`` 3x3 conv + ReLU, then the 2x2 pool."""
    for i in range(1, n_convs + 1):
      pad = self.conv1_padding if (block, i) == (1, 1) else 1
      h = layers.conv(width, 3, padding=pad, dtype=self.dtype,
                      name=f'conv{block}_{i}')(h)
      h = nn.relu(h)
    return layers.max_pool(h, 2, 2, ceil_mode=True)

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    """Maps ``x`` ``[B, H, W, C]`` to ``{'pool1': ..., 'pool5': ...}``.

    ``pool{b}`` is the output of block ``b``: ``[B, h_b, w_b, C_b]`` with
    ``h_1 = ceil((H + 2 * conv1_padding - 2) / 2)`` and
    ``h_b = ceil(h_{b-1} / 2)``; channels 64, 128, 256, 512, 512 times
    ``width_mult``.
    """
    feats = {}
    h = x.astype(self.dtype)
    block_fn = layers.maybe_remat(VGG16._block, self.remat, (2, 3, 4))
    for block, n_convs, channels in _BLOCKS:
      h = block_fn(self, h, block, n_convs,
                   scaled_width(channels, self.width_mult))
      feats[f'pool{block}'] = h
    return feats
