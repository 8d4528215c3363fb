"""Dataset registry: metadata (``get_dataset_info``) and record sources (``get_source``).

Every dataset yields records ``{'image': uint8 [H, W, 3], 'label': uint8
[H, W] (class ids 0..K-1, 255 = ignore), 'file_name': str}`` from a grain
random-access source (``len(source)``, ``source[i]``).

``shapes`` is built in (``data/shapes.py``, generated on the fly). Every other
name is a TFDS dataset prepared in ArrayRecord format and read with
``tfds.data_source`` (no TensorFlow needed). Its builder module registers the
metadata with :func:`register_dataset` when imported; builder modules are
listed in ``_DATASET_MODULES`` and imported lazily, on the first lookup of a
name that is not registered yet, so ``import semseg_jax`` stays cheap.

Errors: bad input raises one of two ``ValueError`` subclasses with a one-line
message, never a bare decoder error: :class:`DatasetNotFoundError` (unknown
name, nothing prepared in ``data_dir``) and :class:`BadInputError` (a corrupt,
truncated or oversized image, a label of the wrong size, shape or dtype, a
label value that is not a class id; the message names the file).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Callable, Sequence, Union

import numpy as np

from semseg_jax.data import shapes

# Modules that call `register_dataset` on import (the TFDS builders). A new
# builder module is added here.
_DATASET_MODULES: tuple[str, ...] = tuple(
    f'semseg_jax.data.builders.{m}' for m in
    ('voc', 'cityscapes', 'camvid', 'ade20k', 'nyuv2', 'sunrgbd', 'mapillary_vistas'))

SHAPES_HINT = (f'--config.dataset.name=shapes --config.num_classes={shapes.NUM_CLASSES}')


class DatasetNotFoundError(ValueError):
  """The requested dataset is unknown or not prepared in ``data_dir``."""


class BadInputError(ValueError):
  """A raw image or label (or a prepared record) is unusable.

  The message is one line that names the file (or record) and the problem.
  Raised by the dataset builders (``builders.base``) and ``data.check``.
  """


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetInfo:
  """What a model and the metrics need to know about a dataset.

  Attributes:
    name: the registry name (``config.dataset.name``).
    num_classes: K, the number of classes the labels use (ids ``0..K-1``).
    class_names: K names, in class-id order.
    palette: uint8 ``[K, 3]`` colours for drawing label maps.
    ignore_index: the label value excluded from loss and metrics.
  """
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  palette: np.ndarray
  ignore_index: int = 255

  def __post_init__(self):
    object.__setattr__(self, 'class_names', tuple(self.class_names))
    object.__setattr__(self, 'palette', np.asarray(self.palette, np.uint8))
    if len(self.class_names) != self.num_classes:
      raise ValueError(f'dataset {self.name!r}: {len(self.class_names)} class names for '
                       f'num_classes={self.num_classes}')
    if self.palette.shape != (self.num_classes, 3):
      raise ValueError(f'dataset {self.name!r}: palette shape {self.palette.shape}, '
                       f'expected ({self.num_classes}, 3)')
    if 0 <= self.ignore_index < self.num_classes:
      raise ValueError(f'dataset {self.name!r}: ignore_index={self.ignore_index} is a class id')


InfoLoader = Union[DatasetInfo, Callable[[Union[str, None]], DatasetInfo]]


@dataclasses.dataclass(frozen=True)
class _Entry:
  info: InfoLoader
  tfds_name: str | None  # None: built in (shapes).


_REGISTRY: dict[str, _Entry] = {}
_loaded = False


def register_dataset(name: str, info: InfoLoader, *, tfds_name: str | None = None) -> None:
  """Registers a TFDS dataset under ``name``.

  Args:
    name: the name used in ``config.dataset.name``.
    info: its ``DatasetInfo``, or a function ``data_dir -> DatasetInfo`` (for
      metadata that must be read from the prepared data).
    tfds_name: the TFDS builder name (with optional ``:version`` / config), if
      it differs from ``name``.
  """
  if name in _REGISTRY:
    raise ValueError(f'dataset name {name!r} registered twice')
  _REGISTRY[name] = _Entry(info, tfds_name or name)


_REGISTRY['shapes'] = _Entry(
    DatasetInfo('shapes', shapes.NUM_CLASSES, shapes.CLASS_NAMES, shapes.PALETTE,
                shapes.IGNORE_INDEX), None)


def _load_all() -> None:
  global _loaded
  if not _loaded:
    for module in _DATASET_MODULES:
      importlib.import_module(module)
    _loaded = True


def list_datasets() -> list[str]:
  """Names of all registered datasets, sorted."""
  _load_all()
  return sorted(_REGISTRY)


def _not_prepared(name: str, data_dir: str | None, why: str) -> DatasetNotFoundError:
  where = data_dir if data_dir is not None else '~/tensorflow_datasets (the TFDS default)'
  dir_flag = f' --data_dir={data_dir}' if data_dir is not None else ''
  return DatasetNotFoundError(
      f'dataset {name!r} is not prepared in data_dir={where} ({why}); prepare it with '
      f'`python -m semseg_jax.data.prepare --dataset={name}{dir_flag}` (see the README\'s '
      f'"Datasets" section), or train on the built-in data with {SHAPES_HINT}')


def _entry(name: str) -> _Entry:
  if name not in _REGISTRY:
    _load_all()
  if name not in _REGISTRY:
    raise DatasetNotFoundError(
        f'unknown dataset {name!r} (config.dataset.name); known: {", ".join(list_datasets())}. '
        f'For the built-in data use {SHAPES_HINT}')
  return _REGISTRY[name]


def get_dataset_info(name: str, data_dir: str | None = None) -> DatasetInfo:
  """Metadata of the registered dataset ``name``.

  Raises:
    DatasetNotFoundError: ``name`` is not registered (or its metadata loader
      cannot find the prepared data in ``data_dir``).
  """
  info = _entry(name).info
  if callable(info):
    info = info(data_dir)
  if not isinstance(info, DatasetInfo):
    raise TypeError(f'dataset {name!r}: info loader returned {type(info).__name__}, '
                    'not DatasetInfo')
  return info


def _cfg_get(cfg: Any, key: str) -> Any:
  try:
    return cfg[key]
  except KeyError:
    raise ValueError(f'dataset config has no key dataset.{key}') from None


def get_source(dataset_cfg: Any, split: str, *, data_dir: str | None = None) -> Sequence[Any]:
  """A grain random-access source of ``split`` of the configured dataset.

  Args:
    dataset_cfg: ``config.dataset`` (see ``pipeline.default_dataset_config``);
      uses ``name`` and, for shapes, ``num_train``/``num_eval`` and
      ``shapes_image_size``.
    split: ``'train'``, ``'validation'``, ``'test'`` (shapes) or any TFDS split
      string (``'train[:10%]'``, ...).
    data_dir: TFDS data directory; None = ``dataset_cfg.data_dir``, then the
      TFDS default.

  Returns:
    An object with ``__len__`` and ``__getitem__`` returning records.

  Raises:
    DatasetNotFoundError: the dataset is unknown or not prepared.
  """
  name = _cfg_get(dataset_cfg, 'name')
  if data_dir is None:
    data_dir = dataset_cfg.get('data_dir')
  if name == 'shapes':
    if split not in shapes.SPLITS:
      raise ValueError(f'dataset shapes has splits {shapes.SPLITS}, got {split!r}')
    num = _cfg_get(dataset_cfg, 'num_train' if split == 'train' else 'num_eval')
    return shapes.ShapesSource(split, num, tuple(_cfg_get(dataset_cfg, 'shapes_image_size')))
  tfds_name = _REGISTRY[name].tfds_name if name in _REGISTRY else name
  return _tfds_source(name, tfds_name, split, data_dir)


def _tfds_source(name: str, tfds_name: str, split: str, data_dir: str | None):
  # Imported here: tensorflow_datasets is slow to import and only needed for
  # prepared datasets. It does not import TensorFlow.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  _load_all()  # Registers the builder classes with TFDS.
  if data_dir is not None and not os.path.isdir(os.path.expanduser(data_dir)):
    raise _not_prepared(name, data_dir, 'the directory does not exist')
  try:
    builder = tfds.builder(tfds_name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    # tfds lists every dataset it knows in the message: keep the first line.
    raise _not_prepared(name, data_dir, str(e).strip().splitlines()[0]) from None
  if not builder.is_prepared():
    raise _not_prepared(name, data_dir, f'nothing at {builder.data_dir}')
  available = sorted(builder.info.splits.keys())
  base_split = split.split('[')[0].strip()
  if base_split not in available:
    raise ValueError(f'dataset {name!r} has no split {split!r}; prepared splits: {available}')
  try:
    # download=False: never download or build from inside a training run.
    return tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
  except NotImplementedError as e:  # Prepared as TFRecord: not random access.
    raise _not_prepared(name, data_dir, str(e).strip().splitlines()[0]) from None
