"""The value every segmentation network returns."""
from __future__ import annotations

import flax.struct
import jax


@flax.struct.dataclass
class SegmentationOutput:
  """Output of a segmentation network.

  Attributes:
    logits: ``[B, H, W, K]`` class scores at the input's resolution.
    aux: auxiliary / deep-supervision logits, each ``[B, h, w, K]`` (any
      resolution; the loss resizes labels to them). Empty for most networks.
      Their loss weights come from the config (``config.loss.aux_weights``),
      never from the model.
  """

  logits: jax.Array
  aux: tuple[jax.Array, ...] = ()
