"""pytorch-semseg FRRN A / B <-> Flax.

Arch names: ``'frrnA'`` and ``'frrnB'`` for BatchNorm networks,
``'frrnA_gn'`` and ``'frrnB_gn'`` for upstream's ``group_norm=True``
variant (its norm layers live under ``cgr_unit`` / ``cg_unit`` instead of
``cbr_unit`` / ``cb_unit``). The converter builds the parity network
(``share_pooled_input=True``).

Careful with upstream checkpoints saved under arch ``frrnA``: upstream's
``get_model`` drops the model type, so they hold FRRN **B** weights (keys
``encoding_frru_2_384_32_*``). :func:`upstream_model_type` tells which
network a state dict holds; converting B weights as ``'frrnA'`` fails with
"unexpected key ...".

Upstream module names -> ours: ``conv1`` -> ``conv1``;
``up_residual_units.i`` -> ``in_ru{i}``; ``down_residual_units.i`` ->
``out_ru{i}``; ``encoding_frru_{n}_{c}_{s}_{b}`` -> ``enc{stage}_{b}``;
``decoding_frru_{n}_{c}_{s}_{b}`` -> ``dec{stage}_{b}``; ``split_conv``,
``merge_conv``, ``classif_conv`` keep their names.
"""
from __future__ import annotations

from typing import Any, Mapping

from semseg_jax.convert import ptsemseg
from semseg_jax.convert.ptsemseg import ArchSpec
from semseg_jax.convert.ptsemseg import Rule
from semseg_jax.models.frrn import SPECS


def _conv_norm(torch_prefix: str, flax_path: tuple[str, ...], relu: bool,
               group_norm: bool) -> list[Rule]:
  """Rules of one upstream conv2D{Batch,Group}Norm[Relu] module."""
  norm = 'gn' if group_norm else 'bn'
  unit = {('bn', True): 'cbr_unit', ('bn', False): 'cb_unit',
          ('gn', True): 'cgr_unit', ('gn', False): 'cg_unit'}[norm, relu]
  return [Rule(f'{torch_prefix}.{unit}.0', (*flax_path, 'conv'), 'conv'),
          Rule(f'{torch_prefix}.{unit}.1', (*flax_path, norm), norm)]


def _ru(torch_prefix: str, name: str, group_norm: bool) -> list[Rule]:
  return (_conv_norm(f'{torch_prefix}.conv1', (name, 'conv1'), True,
                     group_norm)
          + _conv_norm(f'{torch_prefix}.conv2', (name, 'conv2'), False,
                       group_norm))


def _rules(model_type: str, group_norm: bool) -> tuple[Rule, ...]:
  rules = _conv_norm('conv1', ('conv1',), True, group_norm)
  for i in range(3):
    rules += _ru(f'up_residual_units.{i}', f'in_ru{i}', group_norm)
    rules += _ru(f'down_residual_units.{i}', f'out_ru{i}', group_norm)
  rules.append(Rule('split_conv', ('split_conv',), 'conv'))
  for part, spec, ours in (('encoding', 'encoder', 'enc'),
                           ('decoding', 'decoder', 'dec')):
    for stage, (n, c, s) in enumerate(SPECS[model_type][spec]):
      for b in range(n):
        key, name = f'{part}_frru_{n}_{c}_{s}_{b}', f'{ours}{stage}_{b}'
        rules += _conv_norm(f'{key}.conv1', (name, 'conv1'), True, group_norm)
        rules += _conv_norm(f'{key}.conv2', (name, 'conv2'), True, group_norm)
        rules.append(Rule(f'{key}.conv_res', (name, 'conv_res'), 'conv'))
  rules += [Rule('merge_conv', ('merge_conv',), 'conv'),
            Rule('classif_conv', ('classif_conv',), 'conv')]
  return tuple(rules)


for _type in ('A', 'B'):
  for _gn in (False, True):
    ptsemseg.register_arch(
        f'frrn{_type}' + ('_gn' if _gn else ''),
        ArchSpec(model=f'frrn{_type}', rules=_rules(_type, _gn),
                 defaults={'share_pooled_input': True, 'group_norm': _gn},
                 num_classes_key='classif_conv.bias', sample_hw=(32, 32)))


def upstream_model_type(state_dict: Mapping[str, Any]) -> str:
  """``'A'`` or ``'B'``: which FRRN an upstream state dict holds.

  B is the one with a 32x pooling stage (``encoding_frru_2_384_32_*``);
  upstream checkpoints saved as ``frrnA`` are usually B (module doc).

  Raises:
    ValueError: the state dict has no FRRU keys at all.
  """
  names = {k.removeprefix('module.').split('.', 1)[0] for k in state_dict}
  if not any(n.startswith('encoding_frru_') for n in names):
    raise ValueError('state dict has no encoding_frru_* keys: not an '
                     'upstream FRRN')
  is_b = any(n.startswith('encoding_frru_2_384_32_') for n in names)
  return 'B' if is_b else 'A'
