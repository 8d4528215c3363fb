"""pytorch-semseg ICNet / ICNet-BN state dicts <-> Flax, and Caffe names.

Registers the converter archs ``'icnet'`` (no BatchNorm: upstream's
``icnet(is_batchnorm=False)``, e.g. ``icnet_cityscapes_train_30k.pth``) and
``'icnetBN'`` (``is_batchnorm=True``, the ``*_bnnomerge`` models) in parity
mode: ``pool_mode='upstream'`` (evaluation pooling hard-coded for 1025x2049
inputs), ``repeat_res3_identity=True`` and the never-applied pyramid convs
(``unused_pool_convs=True``, the model default) that upstream's state dict
holds.

The authors' Caffe models have no pyramid convs, so
:func:`icnet_from_caffe` returns a state dict without them: convert it with
``from_ptsemseg(sd, arch, unused_pool_convs=False)``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from semseg_jax.convert.pspnet import caffe_residual_names
from semseg_jax.convert.pspnet import caffe_to_ptsemseg
from semseg_jax.convert.pspnet import conv_bn_rules
from semseg_jax.convert.pspnet import pyramid_rules
from semseg_jax.convert.pspnet import stage_rules
from semseg_jax.convert.pspnet import stem_rules
from semseg_jax.convert.ptsemseg import ArchSpec
from semseg_jax.convert.ptsemseg import register_arch
from semseg_jax.convert.ptsemseg import Rule


def _cff_rules(name: str) -> list[Rule]:
  return (conv_bn_rules(f'{name}.low_dilated_conv_bn',
                        (name, 'low_dilated_conv_bn'), 'cb_unit')
          + conv_bn_rules(f'{name}.high_proj_conv_bn',
                          (name, 'high_proj_conv_bn'), 'cb_unit')
          + [Rule(f'{name}.low_classifier_conv', (name, 'low_classifier_conv'),
                  'conv')])


def _icnet_rules() -> tuple[Rule, ...]:
  rules = stem_rules()
  for name in ('res_block2', 'res_block3_conv', 'res_block3_identity',
               'res_block4', 'res_block5'):
    rules += stage_rules(name)
  rules += pyramid_rules()
  rules += conv_bn_rules('conv5_4_k1', ('conv5_4_k1',))
  for i in (1, 2, 3):
    rules += conv_bn_rules(f'convbnrelu{i}_sub1', (f'convbnrelu{i}_sub1',))
  rules += _cff_rules('cff_sub24') + _cff_rules('cff_sub12')
  rules.append(Rule('classification', ('classification',), 'conv'))
  return tuple(rules)


ICNET_RULES = _icnet_rules()
PARITY = {'pool_mode': 'upstream', 'repeat_res3_identity': True}

for _arch in ('icnet', 'icnetBN'):
  # sample_hw: upstream's evaluation pooling needs a 33x65 map at 1/32.
  register_arch(_arch, ArchSpec(
      model=_arch, rules=ICNET_RULES, defaults=PARITY,
      num_classes_key='classification.bias', sample_hw=(1025, 2049)))


def icnet_caffe_names(block_config: Sequence[int] = (3, 4, 6, 3)
                      ) -> dict[str, str]:
  """Caffe layer name -> upstream module prefix for ICNet (upstream's
  ``load_pretrained_model`` table; see ``pspnet_caffe_names``)."""
  names = {
      'conv1_1_3x3_s2': 'convbnrelu1_1.cbr_unit',
      'conv1_2_3x3': 'convbnrelu1_2.cbr_unit',
      'conv1_3_3x3': 'convbnrelu1_3.cbr_unit',
      'conv1_sub1': 'convbnrelu1_sub1.cbr_unit',
      'conv2_sub1': 'convbnrelu2_sub1.cbr_unit',
      'conv3_sub1': 'convbnrelu3_sub1.cbr_unit',
      'conv5_4_k1': 'conv5_4_k1.cbr_unit',
      'conv_sub4': 'cff_sub24.low_dilated_conv_bn.cb_unit',
      'conv3_1_sub2_proj': 'cff_sub24.high_proj_conv_bn.cb_unit',
      'conv_sub2': 'cff_sub12.low_dilated_conv_bn.cb_unit',
      'conv3_sub1_proj': 'cff_sub12.high_proj_conv_bn.cb_unit',
      'conv6_cls': 'classification',
      'conv6_sub4': 'cff_sub24.low_classifier_conv',
      'conv6_sub2': 'cff_sub12.low_classifier_conv',
  }
  n2, n3, n4, n5 = block_config
  names.update(caffe_residual_names('conv2', 'res_block2', n2))
  names.update(caffe_residual_names('conv3', 'res_block3_conv', n3, 'conv'))
  names.update(caffe_residual_names('conv3', 'res_block3_identity', n3,
                                    'identity'))
  names.update(caffe_residual_names('conv4', 'res_block4', n4))
  names.update(caffe_residual_names('conv5', 'res_block5', n5))
  return names


def icnet_from_caffe(blobs: Mapping[str, Sequence[np.ndarray]],
                     block_config: Sequence[int] = (3, 4, 6, 3)
                     ) -> dict[str, np.ndarray]:
  """The authors' ICNet Caffe blobs -> upstream state dict (no pyramid
  convs: load with ``unused_pool_convs=False``). BatchNorm layers
  (``{conv}/bn``) are used where present (the ``bnnomerge`` models, arch
  ``'icnetBN'``); the BN-merged models convert with arch ``'icnet'``."""
  return caffe_to_ptsemseg(blobs, icnet_caffe_names(block_config), 'icnet')
