"""semseg-jax: semantic segmentation networks in JAX/Flax.

    import semseg_jax as sj
    model = sj.get_model('fcn8s', num_classes=21)
    variables = jax.jit(model.init, static_argnames='train')(
        jax.random.key(0), x, train=False)  # eager init: a compile per shape
    sj.list_models()

Importing the package neither touches the network nor imports TensorFlow; the
heavier modules load on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = '0.1.0'

_LAZY = {
    'get_model': ('semseg_jax.models', 'get_model'),
    'list_models': ('semseg_jax.models', 'list_models'),
    'SegmentationOutput': ('semseg_jax.models.output', 'SegmentationOutput'),
    'load_config': ('semseg_jax.config', 'load_config'),
    'predict': ('semseg_jax.inference', 'predict'),
    'tune_cpu_malloc': ('semseg_jax.cpu_malloc', 'tune_cpu_malloc'),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + list(_LAZY))
