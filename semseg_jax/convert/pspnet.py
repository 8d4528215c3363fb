"""pytorch-semseg PSPNet state dicts <-> Flax, and the authors' Caffe names.

Registers the converter archs ``'pspnet'`` (ResNet-101, upstream's
``pascal`` / ``cityscapes`` versions) and ``'pspnet_ade20k'`` (ResNet-50),
both in parity mode (``pool_mode='floor'``: upstream's pooling). Upstream's
released checkpoints (``pspnet_101_pascalvoc.pth`` ...) are its own state
dicts wrapped by ``DataParallel`` (``module.`` prefix, which
``from_ptsemseg`` strips) inside ``{"model_state": ...}`` (unwrapped by
``python -m semseg_jax.convert``).

Upstream made those checkpoints from the authors' ``.caffemodel`` files with
its ``load_pretrained_model`` (a ``caffe_pb2`` reader). Without Caffe, the
same weights keyed by Caffe layer name (e.g. dumped by any caffemodel
reader) convert with :func:`caffe_to_ptsemseg`, which applies upstream's
Caffe-name table, then ``from_ptsemseg`` as usual.

Also shared with ``semseg_jax.convert.icnet``: the rule builders for the
blocks of ``semseg_jax.models.backbones.psp_resnet``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from semseg_jax.convert.ptsemseg import ArchSpec
from semseg_jax.convert.ptsemseg import register_arch
from semseg_jax.convert.ptsemseg import Rule

# Rules cover stages of up to this many blocks (ResNet-152 has 36); a rule
# whose Flax leaves the module lacks is skipped.
MAX_BLOCKS = 40


def conv_bn_rules(torch_prefix: str, flax_path: tuple[str, ...],
                  unit: str = 'cbr_unit') -> list[Rule]:
  """Upstream ``conv2DBatchNorm[Relu]`` (``{prefix}.{unit}.0`` conv,
  ``.1`` BatchNorm when present) <-> ``layers.ConvBNAct`` at ``flax_path``."""
  return [Rule(f'{torch_prefix}.{unit}.0', (*flax_path, 'conv'), 'conv'),
          Rule(f'{torch_prefix}.{unit}.1', (*flax_path, 'bn'), 'bn')]


def stage_rules(torch_name: str, flax_name: str | None = None) -> list[Rule]:
  """Upstream ``residualBlockPSP`` ``{name}.layers.{i}`` <-> our
  ``ResidualStage`` ``layers_{i}`` (cbr1, cbr2, cb3 and the shortcut cb4)."""
  flax_name = flax_name or torch_name
  rules = []
  for i in range(MAX_BLOCKS):
    for sub, unit in (('cbr1', 'cbr_unit'), ('cbr2', 'cbr_unit'),
                      ('cb3', 'cb_unit'), ('cb4', 'cb_unit')):
      rules += conv_bn_rules(f'{torch_name}.layers.{i}.{sub}',
                             (flax_name, f'layers_{i}', sub), unit)
  return rules


def stem_rules() -> list[Rule]:
  """``convbnrelu1_{1,2,3}`` <-> ``stem/convbnrelu1_{1,2,3}``."""
  return [r for i in (1, 2, 3)
          for r in conv_bn_rules(f'convbnrelu1_{i}', ('stem', f'convbnrelu1_{i}'))]


def pyramid_rules(n_bins: int = 4) -> list[Rule]:
  """``pyramid_pooling.path_module_list.{i}`` <-> ``pyramid_pooling/path_{i}``."""
  return [r for i in range(n_bins) for r in conv_bn_rules(
      f'pyramid_pooling.path_module_list.{i}', ('pyramid_pooling', f'path_{i}'))]


def _pspnet_rules() -> tuple[Rule, ...]:
  rules = stem_rules()
  for s in (2, 3, 4, 5):
    rules += stage_rules(f'res_block{s}')
  rules += pyramid_rules()
  rules += conv_bn_rules('cbr_final', ('cbr_final',))
  rules += conv_bn_rules('convbnrelu4_aux', ('convbnrelu4_aux',))
  rules += [Rule('classification', ('classification',), 'conv'),
            Rule('aux_cls', ('aux_cls',), 'conv')]
  return tuple(rules)


PSPNET_RULES = _pspnet_rules()

register_arch('pspnet', ArchSpec(
    model='pspnet', rules=PSPNET_RULES, defaults={'pool_mode': 'floor'},
    num_classes_key='classification.bias', sample_hw=(64, 64)))
register_arch('pspnet_ade20k', ArchSpec(
    model='pspnet', rules=PSPNET_RULES,
    defaults={'pool_mode': 'floor', 'block_config': (3, 4, 6, 3)},
    num_classes_key='classification.bias', sample_hw=(64, 64)))


# ----------------------------------------------------------------------------
# Caffe layer names (upstream's load_pretrained_model tables).


def caffe_residual_names(prefix: str, torch_name: str, n_blocks: int,
                         part: str = 'all') -> dict[str, str]:
  """Caffe names of one residual stage -> upstream module prefixes.

  Caffe numbers blocks from 1: ``{prefix}_1_1x1_reduce / _1_3x3 /
  _1_1x1_increase / _1_1x1_proj`` is the projection block, ``{prefix}_{i}_*``
  (``i >= 2``) the identity blocks. ``part='conv'`` keeps block 1 only,
  ``'identity'`` blocks ``2..n`` numbered from 0 (ICNet's split stage 3).
  """
  out = {}
  if part in ('all', 'conv'):
    for caffe, sub in (('1x1_reduce', 'cbr1.cbr_unit'), ('3x3', 'cbr2.cbr_unit'),
                       ('1x1_increase', 'cb3.cb_unit'), ('1x1_proj', 'cb4.cb_unit')):
      out[f'{prefix}_1_{caffe}'] = f'{torch_name}.layers.0.{sub}'
  first = 1 if part == 'all' else 0
  if part in ('all', 'identity'):
    for i in range(2, n_blocks + 1):
      for caffe, sub in (('1x1_reduce', 'cbr1.cbr_unit'), ('3x3', 'cbr2.cbr_unit'),
                         ('1x1_increase', 'cb3.cb_unit')):
        out[f'{prefix}_{i}_{caffe}'] = (
            f'{torch_name}.layers.{i - 2 + first}.{sub}')
  return out


def pspnet_caffe_names(block_config: Sequence[int] = (3, 4, 23, 3)
                       ) -> dict[str, str]:
  """Caffe layer name -> upstream module prefix for PSPNet.

  Conv-BN units map to their ``Sequential`` (``...cbr_unit``): the conv is
  ``.0``, the BatchNorm (Caffe layer ``{name}/bn``) ``.1``; plain convs map
  to the ``Conv2d`` itself.
  """
  names = {
      'conv1_1_3x3_s2': 'convbnrelu1_1.cbr_unit',
      'conv1_2_3x3': 'convbnrelu1_2.cbr_unit',
      'conv1_3_3x3': 'convbnrelu1_3.cbr_unit',
      'conv5_4': 'cbr_final.cbr_unit',
      # The auxiliary conv is named after the block that would follow res4.
      f'conv4_{block_config[2] + 1}': 'convbnrelu4_aux.cbr_unit',
      'conv6': 'classification',
      'conv6_1': 'aux_cls',
  }
  for i, b in enumerate((6, 3, 2, 1)):
    names[f'conv5_3_pool{b}_conv'] = (
        f'pyramid_pooling.path_module_list.{i}.cbr_unit')
  for s, n in zip((2, 3, 4, 5), block_config, strict=True):
    names.update(caffe_residual_names(f'conv{s}', f'res_block{s}', n))
  return names


def caffe_to_ptsemseg(blobs: Mapping[str, Sequence[np.ndarray]],
                      names: Mapping[str, str],
                      what: str = 'caffe') -> dict[str, np.ndarray]:
  """Caffe layer blobs -> an upstream state dict (then ``from_ptsemseg``).

  Args:
    blobs: Caffe layer name -> its blobs in Caffe order: a convolution's
      ``[weight [O, I, kh, kw], bias?]``, a BatchNorm layer ``{conv}/bn``'s
      ``[scale, shift, mean, var]`` (any shapes holding ``C`` values, e.g.
      ``[1, C, 1, 1]``).
    names: Caffe conv name -> upstream prefix, e.g.
      :func:`pspnet_caffe_names`. A prefix ending in ``_unit`` is a
      conv-BN ``Sequential`` (conv ``.0``, BatchNorm ``.1`` if the Caffe net
      has ``{conv}/bn``), any other a bare ``Conv2d``.
    what: name used in error messages.

  Returns:
    ``{upstream key: float32 array}`` (BatchNorm ``num_batches_tracked``
    omitted; ``from_ptsemseg`` does not need it).

  Raises:
    ValueError: a layer of ``names`` missing from ``blobs``, a layer of
      ``blobs`` that maps nowhere, or a wrong number of blobs.
  """
  sd: dict[str, np.ndarray] = {}
  used = set()
  for caffe, prefix in names.items():
    if caffe not in blobs:
      raise ValueError(f'{what}: missing Caffe layer {caffe!r} (for '
                       f'{prefix!r})')
    conv = prefix + '.0' if prefix.endswith('_unit') else prefix
    layer = [np.asarray(b, np.float32) for b in blobs[caffe]]
    if len(layer) not in (1, 2):
      raise ValueError(f'{what}: Caffe layer {caffe!r} has {len(layer)} '
                       'blobs, expected weight [and bias]')
    sd[f'{conv}.weight'] = layer[0]
    if len(layer) == 2:
      sd[f'{conv}.bias'] = layer[1].reshape(-1)
    used.add(caffe)
    bn = f'{caffe}/bn'
    if prefix.endswith('_unit') and bn in blobs:
      stats = [np.asarray(b, np.float32).reshape(-1) for b in blobs[bn]]
      if len(stats) != 4:
        raise ValueError(f'{what}: Caffe layer {bn!r} has {len(stats)} blobs, '
                         'expected [scale, shift, mean, var]')
      for suffix, value in zip(('weight', 'bias', 'running_mean',
                                'running_var'), stats):
        sd[f'{prefix}.1.{suffix}'] = value
      used.add(bn)
  unexpected = sorted(set(blobs) - used)
  if unexpected:
    raise ValueError(f'{what}: Caffe layer {unexpected[0]!r} maps to no '
                     'upstream module')
  return sd


def pspnet_from_caffe(blobs: Mapping[str, Sequence[np.ndarray]],
                      block_config: Sequence[int] = (3, 4, 23, 3)
                      ) -> dict[str, np.ndarray]:
  """The authors' PSPNet Caffe blobs (``pspnet101_VOC2012``,
  ``pspnet101_cityscapes``: the default ``block_config``; ``pspnet50_ADE20K``:
  (3, 4, 6, 3)) -> upstream state dict for ``from_ptsemseg``."""
  return caffe_to_ptsemseg(blobs, pspnet_caffe_names(block_config), 'pspnet')
