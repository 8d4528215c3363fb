"""torchvision ResNet (ImageNet) weights <-> our ResNet backbone.

Maps torchvision's state dict (``conv1``, ``bn1``,
``layer{i}.{j}.conv{k}`` / ``bn{k}``, ``layer{i}.{j}.downsample.0`` / ``.1``)
onto :class:`semseg_jax.models.backbones.resnet.ResNet` (``layer{i}_{j}``,
``downsample_conv`` / ``downsample_bn``). The ImageNet classifier ``fc.weight``
/ ``fc.bias`` is accepted and ignored (the backbone has no classifier);
``num_batches_tracked`` and a ``module.`` prefix are accepted too. Otherwise
conversion is strict: every tensor is used once, every backbone leaf is
filled once, and a missing or unexpected key or a wrong shape raises
``ValueError`` naming it.

Library::

    variables = torchvision_resnet(state_dict, depth=18)     # the bare ResNet
    variables = load_backbone(net_variables, state_dict)     # into a network
    state_dict = to_torchvision_resnet(variables, depth=18)  # the inverse

Command line: initialise a network's ResNet from torchvision's file and
write a step-0 workdir, then train in that workdir with the same config::

    python -m semseg_jax.convert.resnet --config=configs/linknet.py \\
        --checkpoint=resnet18-f37072fd.pth --output=runs/linknet
    python -m semseg_jax.main --config=configs/linknet.py --workdir=runs/linknet

(``.pth`` files need torch, read with ``weights_only=True``; a ``.npz`` of
the same keys needs nothing.)
"""
from __future__ import annotations

import os
import re
import sys
from typing import Any, Mapping, Sequence

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from semseg_jax.convert.ptsemseg import fill
from semseg_jax.convert.ptsemseg import normalise
from semseg_jax.convert.ptsemseg import KINDS
from semseg_jax.convert.ptsemseg import Rule
from semseg_jax.models.backbones import resnet as resnet_lib

Path = tuple[str, ...]
# The ImageNet classifier: consumed and dropped.
FC_KEYS = ('fc.weight', 'fc.bias')
_BLOCK_KEY = re.compile(r'^layer([1-4])\.(\d+)\.')
_BLOCK_NAME = re.compile(r'^layer([1-4])_(\d+)$')


def resnet_rules(depth: int, flax_prefix: Path = ()) -> tuple[Rule, ...]:
  """Conversion table of ResNet-``depth`` under ``flax_prefix``."""
  bottleneck, blocks = resnet_lib._check_depth(depth)  # pylint: disable=protected-access
  rules = [Rule('conv1', (*flax_prefix, 'conv1'), 'conv'),
           Rule('bn1', (*flax_prefix, 'bn1'), 'bn')]
  for i, n in enumerate(blocks, start=1):
    for j in range(n):
      block = (*flax_prefix, f'layer{i}_{j}')
      for k in range(1, 4 if bottleneck else 3):
        rules += [Rule(f'layer{i}.{j}.conv{k}', (*block, f'conv{k}'), 'conv'),
                  Rule(f'layer{i}.{j}.bn{k}', (*block, f'bn{k}'), 'bn')]
      # Rules whose leaves the block lacks (no downsample) are skipped.
      rules += [Rule(f'layer{i}.{j}.downsample.0', (*block, 'downsample_conv'),
                     'conv'),
                Rule(f'layer{i}.{j}.downsample.1', (*block, 'downsample_bn'),
                     'bn')]
  return tuple(rules)


def _depth_from(bottleneck: bool, blocks: Sequence[int], what: str) -> int:
  for depth, arch in resnet_lib._ARCHS.items():  # pylint: disable=protected-access
    if arch == (bottleneck, tuple(blocks)):
      return depth
  kind = 'Bottleneck' if bottleneck else 'BasicBlock'
  raise ValueError(f'{what}: {kind} blocks per stage {tuple(blocks)} match no '
                   f'ResNet depth in {sorted(resnet_lib._ARCHS)}')  # pylint: disable=protected-access


def infer_depth(state_dict: Mapping[str, Any]) -> int:
  """ResNet depth of a torchvision state dict (blocks per stage, block type)."""
  counts = [set() for _ in range(4)]
  bottleneck = False
  for key in state_dict:
    key = key.removeprefix('module.')
    m = _BLOCK_KEY.match(key)
    if m:
      counts[int(m.group(1)) - 1].add(int(m.group(2)))
      bottleneck |= key.startswith(f'layer{m.group(1)}.{m.group(2)}.conv3.')
  return _depth_from(bottleneck, [len(c) for c in counts], 'state dict')


def _infer_depth_flax(params: Mapping[str, Any], what: str) -> int:
  counts = [0] * 4
  bottleneck = False
  for name, sub in params.items():
    m = _BLOCK_NAME.match(name)
    if m:
      counts[int(m.group(1)) - 1] += 1
      bottleneck |= 'conv3' in sub
  return _depth_from(bottleneck, counts, what)


def _backbone_targets(depth: int, width_mult: float) -> dict[Path, Any]:
  module = resnet_lib.ResNet(depth, width_mult=width_mult)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda x: module.init(jax.random.key(0), x, train=False), x)
  return traverse_util.flatten_dict(dict(variables))


def _drop_fc(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: v for k, v in sd.items() if k not in FC_KEYS}


def torchvision_resnet(state_dict: Mapping[str, Any], depth: int | None = None,
                       *, width_mult: float = 1.0) -> dict[str, Any]:
  """Imports a torchvision ResNet state dict into our backbone.

  Args:
    state_dict: torchvision ``resnet{depth}`` state dict (numpy arrays or
      torch tensors); ``fc.*`` is ignored.
    depth: 18, 34, 50, 101 or 152; read off the state dict when ``None``.
    width_mult: the backbone's width (1.0 for torchvision's weights).

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` of
    ``ResNet(depth, width_mult=width_mult)`` (float32 jax arrays); any
    ``output_stride`` accepts them (dilation adds no parameters).

  Raises:
    ValueError: unknown depth, missing/unexpected key or a shape mismatch.
  """
  what = 'torchvision resnet'
  sd = _drop_fc(normalise(state_dict, what))
  depth = infer_depth(sd) if depth is None else depth
  flat = fill(sd, resnet_rules(depth), _backbone_targets(depth, width_mult),
               f'{what}{depth}')
  return traverse_util.unflatten_dict(
      {k: jnp.asarray(v) for k, v in flat.items()})


def to_torchvision_resnet(variables: Mapping[str, Any],
                          depth: int | None = None) -> dict[str, np.ndarray]:
  """Exports backbone variables under torchvision's names (no ``fc``).

  BatchNorm layers get ``num_batches_tracked = 0``; torchvision's strict
  ``load_state_dict`` then only misses ``fc.*`` (load with ``strict=False``
  or add a classifier).
  """
  params = variables['params']
  depth = _infer_depth_flax(params, 'variables') if depth is None else depth
  flat = traverse_util.flatten_dict(dict(variables))
  out: dict[str, np.ndarray] = {}
  for rule in resnet_rules(depth):
    found = False
    for t in KINDS[rule.kind]:
      path = (t.collection, *rule.flax, t.leaf)
      if path in flat:
        out[f'{rule.torch}.{t.suffix}'] = t.to_torch(np.asarray(flat[path]))
        found = True
    if found and rule.kind == 'bn':
      out[f'{rule.torch}.num_batches_tracked'] = np.array(0, np.int64)
  return out


def find_backbones(params: Mapping[str, Any], prefix: Path = ()) -> list[Path]:
  """Paths of every ResNet subtree (``conv1``, ``bn1``, ``layer1_0``) in
  ``params``."""
  found = []
  if all(k in params for k in ('conv1', 'bn1', 'layer1_0')):
    found.append(prefix)
  for name, sub in params.items():
    if isinstance(sub, Mapping):
      found += find_backbones(sub, (*prefix, name))
  return found


def load_backbone(variables: Mapping[str, Any], state_dict: Mapping[str, Any],
                  path: Path | None = None) -> dict[str, Any]:
  """Replaces a network's ResNet with torchvision weights.

  Args:
    variables: the network's ``{'params', 'batch_stats'}``.
    state_dict: torchvision ResNet state dict (``fc.*`` ignored).
    path: module path of the backbone (e.g. ``('encoder',)``); found
      automatically when ``None`` and the network has exactly one.

  Returns:
    A copy of ``variables`` with the backbone's params and BatchNorm
    statistics replaced (float32 jax arrays); everything else is kept.

  Raises:
    ValueError: no or several backbones, depth/width mismatch (named by key
      and shape), missing or unexpected keys.
  """
  params = variables['params']
  if path is None:
    paths = find_backbones(params)
    if len(paths) != 1:
      where = ', '.join('/'.join(p) for p in paths) or 'none'
      raise ValueError(f'cannot tell which ResNet to load: the network has '
                       f'{len(paths)} ResNet backbones ({where}); pass path')
    path = paths[0]
  path = tuple(path)
  sub = params
  for name in path:
    if not isinstance(sub, Mapping) or name not in sub:
      raise ValueError(f'no module {"/".join(path)!r} in the network params')
    sub = sub[name]
  depth = _infer_depth_flax(sub, f'backbone {"/".join(path)}')
  flat = traverse_util.flatten_dict(dict(variables))
  n = len(path)
  targets = {k: v for k, v in flat.items() if k[1:1 + n] == path}
  what = f'torchvision resnet{depth} -> {"/".join(path)}'
  sd = _drop_fc(normalise(state_dict, what))
  filled = fill(sd, resnet_rules(depth, path), targets, what)
  new = {**flat, **{k: jnp.asarray(v) for k, v in filled.items()}}
  return traverse_util.unflatten_dict(new)


# ----------------------------------------------------------------------------
# Command line.


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A state dict from ``.npz`` (numpy) or ``.pth`` (torch, safe loader)."""
  if path.endswith('.npz'):
    with np.load(path) as d:
      return {k: d[k] for k in d.files}
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f'reading {path} needs torch (pip install torch), or '
                      'save the state dict as .npz') from None
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'cannot read checkpoint {path}: {e}') from None
  if not isinstance(obj, dict) or not all(hasattr(v, 'numpy')
                                          for v in obj.values()):
    raise ValueError(f'{path} does not hold a state dict')
  return {k: v.detach().cpu().numpy() for k, v in obj.items()}


def init_workdir(config, state_dict: Mapping[str, Any], output: str,
                 path: Path | None = None) -> str:
  """Writes step 0 of ``output``: ``config``'s network, freshly initialised,
  with its ResNet replaced by ``state_dict``. Training with the same config
  in ``output`` starts from it (the optimizer state is the fresh one)."""
  # pylint: disable=g-import-not-at-top
  from semseg_jax import checkpoint as ckpt
  from semseg_jax import config as config_lib
  from semseg_jax import sharding
  from semseg_jax import train
  # pylint: enable=g-import-not-at-top
  config_lib.validate_config(config)
  if os.path.isdir(os.path.join(output, 'checkpoints')) and os.listdir(
      os.path.join(output, 'checkpoints')):
    raise ValueError(f'{output} already has checkpoints; use a new --output')
  mesh = sharding.create_mesh()
  model = train.create_model(config)
  state = train.create_train_state(config, model, mesh)
  variables = load_backbone(
      {'params': state.params, 'batch_stats': state.batch_stats}, state_dict,
      path)
  state = state.replace(params=variables['params'],
                        batch_stats=variables['batch_stats'])
  state = jax.device_put(state, sharding.replicated(mesh))
  os.makedirs(output, exist_ok=True)
  with open(os.path.join(output, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  manager = ckpt.create_manager(output)
  ckpt.save(manager, 0, state)
  manager.wait_until_finished()
  manager.close()
  return output


def main(argv):
  # pylint: disable=g-import-not-at-top
  from absl import flags
  # pylint: enable=g-import-not-at-top
  del argv
  f = flags.FLAGS
  for name in ('config', 'checkpoint', 'output'):
    if not getattr(f, name):
      sys.exit(f'error: --{name} is required')
  path = tuple(f.path.split('/')) if f.path else None
  try:
    init_workdir(f.config, read_state_dict(f.checkpoint), f.output, path)
  except (ValueError, ImportError, OSError) as e:
    sys.exit(f'error: {e}')
  print(f'wrote {f.output}; train with: python -m semseg_jax.main '
        f'--config=<the same config> --workdir={f.output}')


if __name__ == '__main__':
  # pylint: disable=g-import-not-at-top
  from absl import app
  from absl import flags
  from ml_collections import config_flags
  # pylint: enable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Network config file.',
                                  lock_config=True)
  flags.DEFINE_string('checkpoint', None,
                      'torchvision ResNet state dict (.pth or .npz).')
  flags.DEFINE_string('output', None, 'Workdir to create.')
  flags.DEFINE_string('path', None, "Backbone module path, e.g. 'encoder' "
                      '(default: the only ResNet in the network).')
  app.run(main)
