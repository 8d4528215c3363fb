"""pytorch-semseg SegNet <-> Flax, and torchvision VGG16 -> SegNet's encoder.

Upstream names every layer ``{down,up}{b}.conv{i}.cbr_unit.{0: Conv2d,
1: BatchNorm2d}``; ours are ``{down,up}{b}/conv{i}/{conv,bn}``. The converter
builds the parity network (``final_bn_relu=True``, ``ceil_mode=False``); pass
``final_bn_relu=False`` etc. only with weights that have that layout.
"""
from __future__ import annotations

from typing import Any, Mapping

from flax import traverse_util
import jax.numpy as jnp

from semseg_jax.convert import ptsemseg
from semseg_jax.convert.ptsemseg import ArchSpec
from semseg_jax.convert.ptsemseg import Rule
from semseg_jax.models.segnet import DECODER
from semseg_jax.models.segnet import ENCODER


def _blocks():
  """``(block, conv index)`` of every conv, encoder first, in upstream's
  order (which is also torchvision VGG16's for the encoder)."""
  return [(block, i) for block, widths in (*ENCODER, *DECODER)
          for i in range(1, len(widths) + 1)]


def _rules() -> tuple[Rule, ...]:
  rules = []
  for block, i in _blocks():
    prefix = f'{block}.conv{i}.cbr_unit'
    rules += [Rule(f'{prefix}.0', (block, f'conv{i}', 'conv'), 'conv'),
              Rule(f'{prefix}.1', (block, f'conv{i}', 'bn'), 'bn')]
  return tuple(rules)


ptsemseg.register_arch('segnet', ArchSpec(
    model='segnet', rules=_rules(),
    defaults={'final_bn_relu': True, 'ceil_mode': False},
    num_classes_key='up1.conv2.cbr_unit.0.bias', sample_hw=(32, 32)))

# torchvision ``vgg16().features`` indices of its 13 convolutions, in order.
_TV_VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_TV_CLASSIFIER = tuple(f'classifier.{i}.{s}' for i in (0, 3, 6)
                       for s in ('weight', 'bias'))


def init_from_vgg16(params: Mapping[str, Any],
                    vgg_state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Copies torchvision VGG16 convolutions into SegNet's encoder.

  Upstream's ``segnet.init_vgg16_params``: the 13 ``features.N`` convs
  (weight and bias) replace ``down1/conv1/conv`` ... ``down5/conv3/conv``;
  BatchNorm layers and the decoder keep their values.

  Args:
    params: a SegNet's ``params`` (any options; widths must be VGG16's).
    vgg_state_dict: torchvision ``vgg16`` state dict (``features.N.*``; the
      ``classifier.*`` tensors are accepted and dropped). A ``module.``
      prefix and torch tensors are fine.

  Returns:
    A copy of ``params`` with the encoder convs replaced (float32).

  Raises:
    ValueError: a missing or unexpected key or a shape mismatch, naming it.
  """
  what = 'segnet vgg16'
  # pylint: disable=protected-access
  sd = ptsemseg.normalise(vgg_state_dict, what)
  for key in _TV_CLASSIFIER:
    sd.pop(key, None)
  encoder = [(block, i) for block, widths in ENCODER
             for i in range(1, len(widths) + 1)]
  rules = [Rule(f'features.{n}', (block, f'conv{i}', 'conv'), 'conv')
           for n, (block, i) in zip(_TV_VGG16_CONVS, encoder, strict=True)]
  flat = traverse_util.flatten_dict(dict(params))
  targets = {('params', *p): v for p, v in flat.items()
             if p[0].startswith('down') and p[2] == 'conv'}
  filled = ptsemseg.fill(sd, rules, targets, what)
  # pylint: enable=protected-access
  new = {p[1:]: jnp.asarray(v) for p, v in filled.items()}
  return traverse_util.unflatten_dict({**flat, **new})
