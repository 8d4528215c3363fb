"""Model registry: ``get_model(name, num_classes, **kw)`` and ``list_models()``.

Each network lives in its own module and registers a factory under one or more
names with :func:`register`. Modules are imported lazily, on the first call to
:func:`get_model` or :func:`list_models`, so ``import semseg_jax`` stays cheap.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import flax.linen as nn

from semseg_jax.models.output import SegmentationOutput

# Modules that register networks. A new network file is added here.
_MODEL_MODULES = (
    'semseg_jax.models.fcn',
    'semseg_jax.models.unet',
    'semseg_jax.models.segnet',
    'semseg_jax.models.frrn',
    'semseg_jax.models.pspnet',
    'semseg_jax.models.icnet',
    'semseg_jax.models.linknet',
    'semseg_jax.models.fcdensenet',
    'semseg_jax.models.enet',
    'semseg_jax.models.gfrnet',
    'semseg_jax.models.refinenet',
    'semseg_jax.models.deeplabv3plus',
)

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_loaded = False


def register(*names: str):
  """Registers a Module class (or factory) under ``names``."""

  def wrap(factory):
    for name in names:
      if name in _REGISTRY:
        raise ValueError(f'model name {name!r} registered twice')
      _REGISTRY[name] = factory
    return factory

  return wrap


def _load_all():
  global _loaded
  if not _loaded:
    for module in _MODEL_MODULES:
      importlib.import_module(module)
    _loaded = True


def list_models() -> list[str]:
  """Names of all registered networks, sorted."""
  _load_all()
  return sorted(_REGISTRY)


def _accepted_fields(factory) -> set[str] | None:
  if dataclasses.is_dataclass(factory):
    return {f.name for f in dataclasses.fields(factory)
            if f.init and f.name not in ('parent', 'name')}
  return None


def model_options(name: str) -> frozenset[str]:
  """The options :func:`get_model` accepts for ``name`` (empty if not a dataclass)."""
  _load_all()
  if name not in _REGISTRY:
    raise ValueError(
        f'unknown model {name!r}; registered models: {", ".join(list_models())}')
  return frozenset(_accepted_fields(_REGISTRY[name]) or ())


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds the network registered as ``name``.

  Args:
    name: a name from :func:`list_models`.
    num_classes: number of output classes ``K``.
    **kwargs: network options (the dataclass fields of its Module), e.g.
      ``dtype=jnp.bfloat16``.

  Returns:
    An unbound ``flax.linen.Module`` whose ``__call__(x, *, train)`` maps NHWC
    images to a :class:`SegmentationOutput`.

  Raises:
    ValueError: unknown ``name`` or an option the network does not have.
  """
  _load_all()
  if name not in _REGISTRY:
    raise ValueError(
        f'unknown model {name!r}; registered models: {", ".join(list_models())}')
  factory = _REGISTRY[name]
  accepted = _accepted_fields(factory)
  if accepted is not None:
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
      raise ValueError(
          f'model {name!r} has no option {unknown[0]!r}; its options are: '
          f'{", ".join(sorted(accepted - {"num_classes"}))}')
  return factory(num_classes=num_classes, **kwargs)


__all__ = ['SegmentationOutput', 'get_model', 'list_models', 'register']
