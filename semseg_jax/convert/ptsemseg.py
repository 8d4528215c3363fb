"""pytorch-semseg / torchvision state dicts <-> Flax variables.

The mapping is table-driven. A :class:`Rule` ties one upstream module prefix
(``'conv_block1.0'``) to one Flax module path (``('backbone', 'conv1_1')``)
and a *kind* (``'conv'``, ``'conv_transpose'``, ``'bn'``, ``'linear'``) that
knows the upstream tensor names of that kind of layer and how to re-lay them
out. An :class:`ArchSpec` lists the rules of one network and how to build it
in parity mode. To support a new network, add its rules and
``register_arch('name', ArchSpec(...))``; nothing else changes.

Tables may list rules the Flax module does not have (e.g. FCN-8s' transposed
convs when ``upsample='nearest'``): a rule fills only the leaves that exist
in the module. Conversion is strict: every upstream tensor is used exactly
once and every Flax leaf is filled exactly once, and a missing key, an
unexpected key or a shape mismatch raises ``ValueError`` naming it.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from semseg_jax.models import get_model

Path = tuple[str, ...]


# ----------------------------------------------------------------------------
# Layer kinds: upstream suffix -> (collection, Flax leaf, to_flax, to_torch).


def _conv_to_flax(w: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """torch Conv2d ``[O, I, kh, kw]`` (or a Linear ``[O, I*kh*kw]`` used as
  a conv, e.g. VGG's fc6) -> HWIO."""
  if w.ndim == 2 and len(shape) == 4:
    kh, kw, i, o = shape
    if w.size != kh * kw * i * o:
      return w  # the shape check reports it
    w = w.reshape(o, i, kh, kw)  # torch flattens (C, H, W)
  return w.transpose(2, 3, 1, 0) if w.ndim == 4 else w


def _conv_to_torch(k: np.ndarray) -> np.ndarray:
  return k.transpose(3, 2, 0, 1)


def _convt_to_flax(w: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """torch ConvTranspose2d ``[I, O, kh, kw]`` -> ``[kh, kw, I, O]``."""
  del shape
  return w.transpose(2, 3, 0, 1) if w.ndim == 4 else w


def _convt_to_torch(k: np.ndarray) -> np.ndarray:
  return k.transpose(2, 3, 0, 1)


def _linear_to_flax(w: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  del shape
  return w.T if w.ndim == 2 else w


def _same(w: np.ndarray, shape: Sequence[int] | None = None) -> np.ndarray:
  del shape
  return w


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One upstream tensor of a layer kind and where it lives in Flax."""
  suffix: str        # upstream name after the module prefix
  collection: str    # 'params' or 'batch_stats'
  leaf: str          # Flax leaf name
  to_flax: Callable[[np.ndarray, Sequence[int]], np.ndarray] = _same
  to_torch: Callable[[np.ndarray], np.ndarray] = _same


KINDS: dict[str, tuple[Tensor, ...]] = {
    'conv': (Tensor('weight', 'params', 'kernel', _conv_to_flax,
                    _conv_to_torch),
             Tensor('bias', 'params', 'bias')),
    'conv_transpose': (Tensor('weight', 'params', 'kernel', _convt_to_flax,
                              _convt_to_torch),
                       Tensor('bias', 'params', 'bias')),
    'bn': (Tensor('weight', 'params', 'scale'),
           Tensor('bias', 'params', 'bias'),
           Tensor('running_mean', 'batch_stats', 'mean'),
           Tensor('running_var', 'batch_stats', 'var')),
    # GroupNorm: an affine scale and shift, no running statistics.
    'gn': (Tensor('weight', 'params', 'scale'),
           Tensor('bias', 'params', 'bias')),
    'linear': (Tensor('weight', 'params', 'kernel', _linear_to_flax,
                      lambda k: k.T),
               Tensor('bias', 'params', 'bias')),
}
# Upstream buffers consumed and dropped (BatchNorm's step counter).
IGNORED_SUFFIXES = ('num_batches_tracked',)


@dataclasses.dataclass(frozen=True)
class Rule:
  """Upstream module ``torch`` <-> Flax module at ``flax`` of kind ``kind``."""
  torch: str
  flax: Path
  kind: str


@dataclasses.dataclass(frozen=True)
class ArchSpec:
  """How to convert one upstream network.

  Attributes:
    model: registry name of the Flax network.
    rules: the mapping table (a superset is fine, see module doc).
    defaults: model options of upstream's computation (parity mode);
      caller's ``model_kwargs`` override them.
    num_classes_key: upstream tensor whose first dim is ``K`` (used when
      the caller does not pass ``num_classes``).
    sample_hw: an input ``(H, W)`` the parity-mode module accepts, for
      shape inference.
    infer: reads model options off the (normalised) state dict, e.g.
      U-Net's ``feature_scale`` from its first convolution's width; the
      caller's ``model_kwargs`` override them.
  """
  model: str
  rules: tuple[Rule, ...]
  defaults: Mapping[str, Any]
  num_classes_key: str
  sample_hw: tuple[int, int]
  infer: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None


ARCHS: dict[str, ArchSpec] = {}


def register_arch(name: str, spec: ArchSpec) -> None:
  """Makes ``from_ptsemseg(sd, name)`` / ``to_ptsemseg(v, name)`` work."""
  if name in ARCHS:
    raise ValueError(f'converter for {name!r} registered twice')
  for rule in spec.rules:
    if rule.kind not in KINDS:
      raise ValueError(f'{name}: rule {rule.torch!r} has unknown kind '
                       f'{rule.kind!r}; kinds: {sorted(KINDS)}')
  ARCHS[name] = spec


# ----------------------------------------------------------------------------
# Tables.


def _vgg_rules(prefixes: Sequence[str]) -> list[Rule]:
  """VGG16 convs in order conv1_1 .. conv5_3 from 13 upstream prefixes."""
  names = [f'conv{b}_{i}' for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
           for i in range(1, n + 1)]
  return [Rule(p, ('backbone', n), 'conv')
          for p, n in zip(prefixes, names, strict=True)]


# Upstream's conv_block{b} Sequentials hold convs at even indices.
_FCN_RULES = tuple(
    _vgg_rules([f'conv_block{b}.{i}'
                for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
                for i in range(0, 2 * n, 2)])
    + [Rule('classifier.0', ('fc6',), 'conv'),
       Rule('classifier.3', ('fc7',), 'conv'),
       Rule('classifier.6', ('score_fr',), 'conv'),
       Rule('score_pool4', ('score_pool4',), 'conv'),
       Rule('score_pool3', ('score_pool3',), 'conv')]
    + [Rule(n, (n,), 'conv_transpose') for n in
       ('upscore', 'upscore2', 'upscore4', 'upscore8', 'upscore16')])

for _name in ('fcn32s', 'fcn16s', 'fcn8s'):
  register_arch(_name, ArchSpec(model=_name, rules=_FCN_RULES, defaults={},
                                num_classes_key='classifier.6.bias',
                                sample_hw=(32, 32)))


def _unet_rules() -> tuple[Rule, ...]:
  rules = []
  for blk in ('conv1', 'conv2', 'conv3', 'conv4', 'center'):
    for c in ('conv1', 'conv2'):
      rules += [Rule(f'{blk}.{c}.0', (blk, c, 'conv'), 'conv'),
                Rule(f'{blk}.{c}.1', (blk, c, 'bn'), 'bn')]
  for i in range(1, 5):
    blk = f'up_concat{i}'
    rules.append(Rule(f'{blk}.up', (blk, 'up'), 'conv_transpose'))
    rules += [Rule(f'{blk}.conv.{c}.0', (blk, 'conv', c, 'conv'), 'conv')
              for c in ('conv1', 'conv2')]
  rules.append(Rule('final', ('final',), 'conv'))
  return tuple(rules)


def _unet_options(sd: Mapping[str, Any]) -> dict[str, Any]:
  """``feature_scale`` from ``conv1``'s width (``64 / feature_scale``):
  upstream's default is 4, but checkpoints are trained with others."""
  key = 'conv1.conv1.0.weight'
  return ({'feature_scale': 64 / int(sd[key].shape[0])} if key in sd else {})


register_arch('unet', ArchSpec(model='unet', rules=_unet_rules(),
                               defaults={'padding': 'valid'},
                               num_classes_key='final.bias',
                               sample_hw=(188, 188), infer=_unet_options))


# ----------------------------------------------------------------------------
# Engine.


def _to_numpy(v: Any) -> np.ndarray:
  """numpy array from a numpy array, jax array or torch tensor."""
  for attr in ('detach', 'cpu'):
    if hasattr(v, attr) and not isinstance(v, np.ndarray):
      v = getattr(v, attr)()
  if hasattr(v, 'numpy') and not isinstance(v, np.ndarray):
    v = v.numpy()
  return np.asarray(v)


def normalise(state_dict: Mapping[str, Any],
              what: str) -> dict[str, np.ndarray]:
  """Strips ``module.`` (DataParallel), converts to numpy, drops ignored."""
  out = {}
  for key, value in state_dict.items():
    name = key[len('module.'):] if key.startswith('module.') else key
    if name in out:
      raise ValueError(f'{what}: key {name!r} appears with and without the '
                       "'module.' prefix")
    if name.rsplit('.', 1)[-1] in IGNORED_SUFFIXES:
      continue
    out[name] = _to_numpy(value)
  return out


def fill(sd: dict[str, np.ndarray], rules: Sequence[Rule],
         flat_target: Mapping[Path, Any], what: str) -> dict[Path, np.ndarray]:
  """Maps upstream tensors onto ``flat_target``'s leaves (strictly)."""
  out: dict[Path, np.ndarray] = {}
  used: set[str] = set()
  for rule in rules:
    for t in KINDS[rule.kind]:
      path = (t.collection, *rule.flax, t.leaf)
      if path not in flat_target:
        continue
      key = f'{rule.torch}.{t.suffix}'
      if key not in sd:
        raise ValueError(f'{what}: missing key {key!r} in the state dict '
                         f'(needed for {"/".join(path)})')
      shape = tuple(flat_target[path].shape)
      value = t.to_flax(sd[key], shape)
      if value.shape != shape:
        want = t.to_torch(np.broadcast_to(np.float32(0), shape)).shape
        raise ValueError(f'{what}: key {key!r} has shape {sd[key].shape}, '
                         f'expected {want} (for {"/".join(path)} {shape})')
      if path in out:
        raise ValueError(f'{what}: two rules fill {"/".join(path)}')
      out[path] = value.astype(np.float32)
      used.add(key)
  unexpected = sorted(set(sd) - used)
  if unexpected:
    more = f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''
    raise ValueError(f'{what}: unexpected key {unexpected[0]!r} in the state '
                     f'dict{more}')
  missing = sorted(set(flat_target) - set(out))
  if missing:
    raise ValueError(f'{what}: no upstream tensor maps to '
                     f'{"/".join(missing[0])} (conversion table incomplete)')
  return out


# Modules with the rules of further networks; each calls register_arch on import.
_RULE_MODULES = ('segnet', 'frrn', 'pspnet', 'icnet')


def _load_rule_modules() -> None:
  for name in _RULE_MODULES:
    importlib.import_module(f'semseg_jax.convert.{name}')


def list_archs() -> list[str]:
  """Every upstream architecture the converter knows, sorted."""
  _load_rule_modules()
  return sorted(ARCHS)


def _spec(arch: str) -> ArchSpec:
  if arch not in ARCHS:
    _load_rule_modules()
  if arch not in ARCHS:
    raise ValueError(f'no converter for arch {arch!r}; known: '
                     f'{", ".join(sorted(ARCHS))}')
  return ARCHS[arch]


def _target(module: nn.Module, spec: ArchSpec) -> dict[Path, Any]:
  """Flat ``{(collection, *path): ShapeDtypeStruct}`` of ``module``."""
  c = getattr(module, 'in_channels', 3)
  x = jax.ShapeDtypeStruct((1, *spec.sample_hw, c), jnp.float32)
  variables = jax.eval_shape(
      lambda x: module.init(jax.random.key(0), x, train=False), x)
  return traverse_util.flatten_dict(dict(variables))


def build(arch: str, num_classes: int, **model_kwargs: Any) -> nn.Module:
  """The Flax network for upstream ``arch`` in parity mode."""
  spec = _spec(arch)
  return get_model(spec.model, num_classes, **{**spec.defaults, **model_kwargs})


def from_ptsemseg(state_dict: Mapping[str, Any], arch: str,
                  **model_kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
  """Imports a pytorch-semseg state dict.

  Args:
    state_dict: upstream parameter name (``module.`` prefix optional) ->
      numpy array or anything with ``.numpy()`` (torch tensors).
      ``num_batches_tracked`` entries are accepted and ignored.
    arch: ``'fcn32s'``, ``'fcn16s'``, ``'fcn8s'``, ``'unet'`` or any name
      added with :func:`register_arch`.
    **model_kwargs: network options (e.g. ``feature_scale=4``); parity-mode
      defaults otherwise. ``num_classes`` is read off the state dict unless
      given.

  Returns:
    ``(module, variables)``: the Flax module and ``{'params': ...}`` plus
    ``'batch_stats'`` when it has BatchNorm; float32 jax arrays.

  Raises:
    ValueError: unknown arch, missing/unexpected key or shape mismatch.
  """
  spec = _spec(arch)
  sd = normalise(state_dict, arch)
  if 'num_classes' not in model_kwargs:
    if spec.num_classes_key not in sd:
      raise ValueError(f'{arch}: missing key {spec.num_classes_key!r} in the '
                       'state dict (it gives num_classes)')
    model_kwargs['num_classes'] = int(sd[spec.num_classes_key].shape[0])
  if spec.infer is not None:
    model_kwargs = {**spec.infer(sd), **model_kwargs}
  module = build(arch, **model_kwargs)
  flat = fill(sd, spec.rules, _target(module, spec), arch)
  variables = traverse_util.unflatten_dict(
      {k: jnp.asarray(v) for k, v in flat.items()})
  return module, variables


def to_ptsemseg(variables: Mapping[str, Any],
                arch: str) -> dict[str, np.ndarray]:
  """Exports Flax variables under upstream names (inverse of
  :func:`from_ptsemseg`); BatchNorm layers get ``num_batches_tracked = 0`` so
  that torch's strict ``load_state_dict`` accepts the result."""
  spec = _spec(arch)
  flat = traverse_util.flatten_dict(dict(variables))
  out: dict[str, np.ndarray] = {}
  for rule in spec.rules:
    found = False
    for t in KINDS[rule.kind]:
      path = (t.collection, *rule.flax, t.leaf)
      if path in flat:
        out[f'{rule.torch}.{t.suffix}'] = t.to_torch(np.asarray(flat[path]))
        found = True
    if found and rule.kind == 'bn':
      out[f'{rule.torch}.num_batches_tracked'] = np.array(0, np.int64)
  return out


# ----------------------------------------------------------------------------
# torchvision VGG16 -> FCN encoder.

# torchvision ``vgg16().features`` indices of its 13 convolutions.
_TV_VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_TV_VGG16_RULES = tuple(
    _vgg_rules([f'features.{i}' for i in _TV_VGG16_CONVS])
    + [Rule('classifier.0', ('fc6',), 'conv'),
       Rule('classifier.3', ('fc7',), 'conv')])


def vgg16(state_dict: Mapping[str, Any],
          params: Mapping[str, Any] | None = None,
          copy_fc8: bool = False) -> dict[str, Any]:
  """Imports torchvision VGG16 weights into an FCN's encoder.

  Args:
    state_dict: torchvision ``vgg16`` state dict (``features.N.*``,
      ``classifier.{0,3,6}.*``). ``classifier.0`` / ``.3`` become ``fc6`` (a
      7x7 conv) / ``fc7`` (1x1). ``classifier.6`` (ImageNet fc8) is consumed
      and dropped unless ``copy_fc8``.
    params: an FCN's ``params`` (any of fcn32s/16s/8s, width 1.0). If given,
      a copy with ``backbone``, ``fc6``, ``fc7`` (and ``score_fr`` with
      ``copy_fc8``) replaced is returned; otherwise only those subtrees.
    copy_fc8: like upstream's ``init_vgg16_params(copy_fc8=True)``, fill
      ``score_fr`` with the first ``K`` rows of fc8 (needs ``params``).

  Returns:
    A params dict (float32 jax arrays).

  Raises:
    ValueError: missing/unexpected key or a shape mismatch, naming it.
  """
  what = 'vgg16'
  sd = normalise(state_dict, what)
  fc8 = {k: sd.pop(k) for k in ('classifier.6.weight', 'classifier.6.bias')
         if k in sd}
  if params is None:
    if copy_fc8:
      raise ValueError('vgg16: copy_fc8=True needs the FCN params')
    target = _target(get_model('fcn32s', 1), ARCHS['fcn32s'])
    flat_params = {p[1:]: v for p, v in target.items() if p[0] == 'params'}
  else:
    flat_params = traverse_util.flatten_dict(dict(params))
  rules = list(_TV_VGG16_RULES)
  targets = {('params', *p): v for p, v in flat_params.items()
             if p[0] in ('backbone', 'fc6', 'fc7')}
  if copy_fc8:
    rules.append(Rule('classifier.6', ('score_fr',), 'conv'))
    k = flat_params[('score_fr', 'bias')].shape[0]
    for suffix in ('weight', 'bias'):
      key = f'classifier.6.{suffix}'
      if key not in fc8:
        raise ValueError(f'vgg16: missing key {key!r} (copy_fc8=True)')
      sd[key] = fc8[key][:k]
    targets.update({('params', *p): v for p, v in flat_params.items()
                    if p[0] == 'score_fr'})
  filled = fill(sd, rules, targets, what)
  new = {p[1:]: jnp.asarray(v) for p, v in filled.items()}
  if params is None:
    return traverse_util.unflatten_dict(new)
  return traverse_util.unflatten_dict({**flat_params, **new})
