"""grain input pipelines: source -> augment -> shuffle -> shard -> batch -> prefetch.

Train batches are ``{'image': float32 [b, H, W, 3] normalised, 'label': int32
[b, H, W]}`` numpy arrays, ``b`` being the per-process batch and ``(H, W) =
dataset.image_size``; eval batches add ``'valid': bool [b, H, W]`` (True on
real pixels) with ``(H, W) = eval_pad_size(cfg)``. The trainer assembles the
global ``jax.Array`` (``jax.make_array_from_process_local_data``).

Training (``make_train_iterator``) is an infinite stream built with grain's
dataset API::

  MapDataset.source(src)
    .random_map(TrainTransform)      # rng of example i in epoch e: (seed, e * N + i)
    .shuffle().repeat()              # a new permutation every epoch, from the seed
    [process_index::process_count]   # sharding
    .batch(b, drop_remainder=True)
    .to_iter_dataset(ReadOptions)    # reader threads + prefetch buffer
    .mp_prefetch(num_workers)        # optional worker processes

Augmentation is applied before the shuffle so each example's random crop,
flip, ... depend only on (seed, epoch, example index), not on where the
shuffle or the sharding puts it.

Sharding is grain's standard strided slice of the shuffled stream: element k
goes to process ``k % P``. Process p's t-th batch holds stream elements
``t*B + p + P*j`` (``j < b``, ``B = b*P``), so the P local batches of step t
are disjoint and together are exactly elements ``[t*B, (t+1)*B)``: the same
global batches as one process reading batches of B. Batches are formed before
the worker slicing, so ``num_workers`` changes speed, never the data.

The iterator's position is ``it.get_state()`` / ``it.set_state(state)`` (a
small JSON-able dict), which Orbax saves with ``grain.checkpoint.CheckpointSave
(it)`` / ``CheckpointRestore(it)``.

Evaluation (``make_eval_iterator``) is one deterministic pass in which every
example appears exactly once over all processes; every process yields the same
number of batches, the last ones padded with all-ignore examples. Images keep
their full resolution (after the optional ``dataset.resize``): each is padded
at the bottom/right to ``eval_pad_size(cfg)``, the label with 255 and
``valid`` False there, so metrics count only real pixels. An image larger
than the pad size is an error naming the file and both sizes, unless
``dataset.eval_shrink_to_fit`` (then it is shrunk to fit, keeping its aspect).
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping

from absl import flags
import grain
import ml_collections
import numpy as np

from semseg_jax.data import transforms

_KEYS = ('name', 'data_dir', 'train_split', 'eval_split', 'image_size', 'resize', 'center_crop',
         'scale_range', 'rotate', 'translate', 'hflip', 'vflip', 'color_jitter', 'hue', 'gamma',
         'normalization', 'mean', 'std', 'eval_pad_size', 'eval_shrink_to_fit', 'num_workers',
         'prefetch', 'num_train', 'num_eval', 'shapes_image_size')


def default_dataset_config() -> ml_collections.ConfigDict:
  """``config.dataset`` defaults: the built-in shapes at 128x128 (configs/default.py's values)."""
  placeholder = ml_collections.config_dict.placeholder
  cfg = ml_collections.ConfigDict()
  cfg.name = 'shapes'  # 'shapes' or a registered, prepared TFDS dataset ('voc2012', ...).
  cfg.data_dir = placeholder(str)  # TFDS data_dir; None = default.
  cfg.train_split = 'train'
  cfg.eval_split = 'validation'
  cfg.image_size = (128, 128)  # Train crop (H, W), pixels.
  cfg.resize = placeholder(tuple)  # (H, W) every train and eval image is resized to first.
  cfg.center_crop = placeholder(tuple)  # Train: central (H, W) window after `resize`.
  cfg.scale_range = (0.75, 1.25)  # Random rescale factor range before the crop; None = off.
  cfg.rotate = 0.0  # Random rotation, max degrees either way; 0 = off.
  cfg.translate = 0.0  # Random shift, max fraction of each side; 0 = off.
  cfg.hflip = True  # Random left-right flip.
  cfg.vflip = False  # Random top-bottom flip.
  cfg.color_jitter = 0.0  # Brightness/contrast/saturation strength in [0, 1); 0 = off.
  cfg.hue = 0.0  # Random hue shift, max turns in [0, 0.5]; 0 = off.
  cfg.gamma = placeholder(tuple)  # Random gamma range (lo, hi); None = off.
  cfg.normalization = 'imagenet'  # 'imagenet' (RGB), 'caffe_bgr' or 'custom' (mean/std).
  cfg.mean = placeholder(tuple)  # 'custom' only: per-channel mean, 0-255 units, RGB.
  cfg.std = placeholder(tuple)  # 'custom' only: per-channel std, 0-255 units.
  cfg.eval_pad_size = placeholder(tuple)  # Eval batch (H, W); None = see eval_pad_size().
  cfg.eval_shrink_to_fit = False  # Eval: shrink images larger than the pad size (else error).
  cfg.num_workers = 0  # grain worker processes; 0 = all in this process.
  cfg.prefetch = 2  # Batches read ahead (reader threads = min(prefetch, CPUs)).
  cfg.num_train = 2000  # shapes only: examples in its train split.
  cfg.num_eval = 200  # shapes only: examples in its validation/test splits.
  cfg.shapes_image_size = (128, 128)  # shapes only: generated image size (H, W).
  return cfg


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _size(cfg: Mapping[str, Any], key: str, minimum: int = 1, optional: bool = False) -> None:
  value = cfg[key]
  if optional and value is None:
    return
  if (not isinstance(value, (tuple, list)) or len(value) != 2
      or not all(_is_int(v) and v >= minimum for v in value)):
    raise ValueError(f'dataset.{key} must be {"None or " if optional else ""}(H, W) with ints '
                     f'>= {minimum}, got {value!r}')


def _range(cfg: Mapping[str, Any], key: str) -> None:
  value = cfg[key]
  if value is not None and (not isinstance(value, (tuple, list)) or len(value) != 2
                            or not all(_is_number(s) for s in value)
                            or not 0 < value[0] <= value[1]):
    raise ValueError(f'dataset.{key} must be None or (lo, hi) with 0 < lo <= hi, got {value!r}')


def _number(cfg: Mapping[str, Any], key: str, low: float, high: float, what: str) -> None:
  value = cfg[key]
  if not _is_number(value) or not low <= value <= high:
    raise ValueError(f'dataset.{key} must be a number in {what}, got {value!r}')


def validate_dataset_config(cfg: Mapping[str, Any]) -> None:
  """Raises ``ValueError`` naming ``dataset.<key>`` for a missing, unknown or bad value."""
  keys = set(cfg.keys())
  for key in _KEYS:
    if key not in keys:
      raise ValueError(f'dataset.{key} is missing from the config')
  for key in sorted(keys - set(_KEYS)):
    raise ValueError(f'dataset.{key} is not a known dataset option; known: {", ".join(_KEYS)}')
  for key in ('name', 'train_split', 'eval_split'):
    if not isinstance(cfg[key], str) or not cfg[key]:
      raise ValueError(f'dataset.{key} must be a non-empty string, got {cfg[key]!r}')
  if cfg['data_dir'] is not None and not isinstance(cfg['data_dir'], str):
    raise ValueError(f'dataset.data_dir must be a path string or None, got {cfg["data_dir"]!r}')
  _size(cfg, 'image_size')
  _size(cfg, 'shapes_image_size', minimum=8)
  for key in ('resize', 'center_crop', 'eval_pad_size'):
    _size(cfg, key, optional=True)
  _range(cfg, 'scale_range')
  _range(cfg, 'gamma')
  for key in ('hflip', 'vflip', 'eval_shrink_to_fit'):
    if not isinstance(cfg[key], bool):
      raise ValueError(f'dataset.{key} must be True or False, got {cfg[key]!r}')
  _number(cfg, 'rotate', 0, 180, '[0, 180] (degrees)')
  _number(cfg, 'translate', 0, 1, '[0, 1] (fraction of the side)')
  _number(cfg, 'hue', 0, 0.5, '[0, 0.5] (turns)')
  if not _is_number(cfg['color_jitter']) or not 0 <= cfg['color_jitter'] < 1:
    raise ValueError(f'dataset.color_jitter must be a number in [0, 1), got '
                     f'{cfg["color_jitter"]!r}')
  preset = cfg['normalization']
  if preset != 'custom':
    _preset(preset)
  for key in ('mean', 'std'):
    value = cfg[key]
    if preset != 'custom':
      if value is not None:
        raise ValueError(f'dataset.{key}={value!r} is only used with dataset.normalization='
                         f"'custom' (dataset.normalization={preset!r} has its own); set one")
      continue
    if (not isinstance(value, (tuple, list)) or len(value) != 3
        or not all(_is_number(v) and v >= 0 for v in value)
        or (key == 'std' and not all(v > 0 for v in value))):
      raise ValueError(f'dataset.{key} must be 3 {"positive" if key == "std" else "non-negative"}'
                       f" numbers in 0-255 units (RGB) with dataset.normalization='custom', "
                       f'got {value!r}')
  for key, low in (('num_workers', 0), ('prefetch', 0), ('num_train', 1), ('num_eval', 1)):
    if not _is_int(cfg[key]) or cfg[key] < low:
      raise ValueError(f'dataset.{key} must be an int >= {low}, got {cfg[key]!r}')


def normalization(cfg: Mapping[str, Any]) -> transforms.Normalization:
  """The ``Normalization`` (mean, std, channel order) that ``cfg`` (``config.dataset``) names.

  Every consumer of network inputs (pipeline, inference, drawing) uses this,
  so the channel order and constants have one source.
  """
  preset = cfg['normalization']
  if preset == 'custom':
    if cfg['mean'] is None or cfg['std'] is None:
      raise ValueError("dataset.normalization='custom' needs dataset.mean and dataset.std")
    return transforms.Normalization(tuple(map(float, cfg['mean'])), tuple(map(float, cfg['std'])))
  return _preset(preset)


def _preset(name: Any) -> transforms.Normalization:
  return transforms.normalization_preset(name, 'dataset.normalization', others=('custom',))


def _tuple(value: Any) -> tuple | None:
  return None if value is None else tuple(value)


def train_transform(cfg: Mapping[str, Any]) -> transforms.TrainTransform:
  """The ``TrainTransform`` that ``cfg`` (``config.dataset``) describes."""
  return transforms.TrainTransform(
      image_size=tuple(cfg['image_size']), normalization=normalization(cfg),
      resize=_tuple(cfg['resize']), center_crop=_tuple(cfg['center_crop']),
      scale_range=_tuple(cfg['scale_range']), rotate=float(cfg['rotate']),
      translate=float(cfg['translate']), hflip=cfg['hflip'], vflip=cfg['vflip'],
      hue=float(cfg['hue']), gamma=_tuple(cfg['gamma']),
      color_jitter=float(cfg['color_jitter']))


# Largest image (H, W) of the datasets whose sizes are fixed or bounded, rounded
# up to a multiple of 32 where that is cheap (VOC: <= 500x500). Datasets with
# unbounded sizes (ADE20K, SUN RGB-D, Mapillary) are not listed: set
# dataset.eval_pad_size (configs/datasets presets do) or eval_shrink_to_fit.
KNOWN_MAX_SIZES = {
    'voc2012': (512, 512),
    'cityscapes': (1024, 2048),
    'camvid': (360, 480),
    'nyuv2': (480, 640),
    'nyuv2_40': (480, 640),
}


def eval_pad_size(cfg: Mapping[str, Any]) -> tuple[int, int]:
  """The (H, W) every eval example is padded to.

  ``dataset.eval_pad_size`` when set; else ``dataset.resize`` when set (every
  image has that size); else, per side, the larger of ``image_size`` and the
  dataset's known largest image (``KNOWN_MAX_SIZES``; for ``shapes``,
  ``shapes_image_size``), so full-resolution evaluation of VOC, Cityscapes,
  CamVid and NYUv2 needs no setting.
  """
  if cfg['eval_pad_size'] is not None:
    return tuple(cfg['eval_pad_size'])
  if cfg['resize'] is not None:
    return tuple(cfg['resize'])
  size = tuple(cfg['image_size'])
  known = (tuple(cfg['shapes_image_size']) if cfg['name'] == 'shapes'
           else KNOWN_MAX_SIZES.get(cfg['name']))
  if known is not None:
    size = tuple(max(a, b) for a, b in zip(size, known))
  return size


def eval_transform(cfg: Mapping[str, Any]) -> transforms.EvalTransform:
  """The ``EvalTransform`` that ``cfg`` (``config.dataset``) describes."""
  return transforms.EvalTransform(
      pad_size=eval_pad_size(cfg), normalization=normalization(cfg),
      resize=_tuple(cfg['resize']), shrink_to_fit=cfg['eval_shrink_to_fit'])


def _check_sharding(batch_size: int, process_index: int, process_count: int) -> None:
  if not _is_int(batch_size) or batch_size < 1:
    raise ValueError(f'per-process batch_size must be a positive int, got {batch_size!r}')
  if not _is_int(process_count) or process_count < 1:
    raise ValueError(f'process_count must be a positive int, got {process_count!r}')
  if not _is_int(process_index) or not 0 <= process_index < process_count:
    raise ValueError(f'process_index must be in [0, {process_count}), got {process_index!r}')


def _finish(ds: grain.MapDataset, cfg: Mapping[str, Any]) -> grain.DatasetIterator:
  """Reader threads, prefetch buffer and optional worker processes; returns the iterator."""
  prefetch = int(cfg['prefetch'])
  threads = min(prefetch, os.cpu_count() or 1)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                prefetch_buffer_size=prefetch))
  if cfg['num_workers'] > 0:
    # grain's worker start-up reads its absl flags, which raises unless flags
    # were parsed (true under absl.app, not in tests or notebooks): use defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(cfg['num_workers']), per_worker_buffer_size=max(1, prefetch)))
  return iter(it_ds)


def _seeds(seed: int) -> tuple[int, int]:
  """Independent 32-bit (shuffle, augmentation) seeds derived from ``seed``."""
  shuffle_seed, augment_seed = np.random.SeedSequence(int(seed)).generate_state(2)
  return int(shuffle_seed), int(augment_seed)


def make_train_dataset(source: Any, cfg: Mapping[str, Any], *, seed: int, batch_size: int,
                       process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """The infinite, shuffled, augmented, sharded ``MapDataset`` of train batches.

  Args:
    source: a random-access source of records (``data.get_source``).
    cfg: ``config.dataset``.
    seed: data seed; order and augmentation are a pure function of it.
    batch_size: the per-process batch ``b``.
    process_index, process_count: this process and the number of processes.
  """
  validate_dataset_config(cfg)
  _check_sharding(batch_size, process_index, process_count)
  if len(source) == 0:
    raise ValueError(f'dataset {cfg["name"]!r} split {cfg["train_split"]!r} is empty')
  shuffle_seed, augment_seed = _seeds(seed)
  ds = grain.MapDataset.source(source)
  ds = ds.random_map(train_transform(cfg), seed=augment_seed)
  ds = ds.shuffle(seed=shuffle_seed).repeat()
  ds = ds[process_index::process_count]
  return ds.batch(batch_size, drop_remainder=True)


def make_train_iterator(source: Any, cfg: Mapping[str, Any], *, seed: int, batch_size: int,
                        process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
  """An endless iterator of per-process train batches (see the module docstring).

  The iterator supports ``get_state()`` / ``set_state()`` and
  ``grain.checkpoint.CheckpointSave/CheckpointRestore``; call ``close()`` on
  it when ``num_workers > 0`` to stop the worker processes promptly.
  """
  ds = make_train_dataset(source, cfg, seed=seed, batch_size=batch_size,
                          process_index=process_index, process_count=process_count)
  return _finish(ds, cfg)


def num_eval_batches(num_examples: int, batch_size: int, process_count: int = 1) -> int:
  """Batches every process yields in one eval pass: ``ceil(N / (b * P))``."""
  return math.ceil(num_examples / (batch_size * process_count))


class _EvalExample:
  """Per-process position ``j`` -> example ``p + P*j``, or padding past the end."""

  def __init__(self, source: Any, transform: transforms.EvalTransform, process_index: int,
               process_count: int):
    self._source = source
    self._transform = transform
    self._index = process_index
    self._count = process_count

  def __call__(self, position: int) -> dict[str, np.ndarray]:
    index = self._index + self._count * int(position)
    if index >= len(self._source):
      return self._transform.padding()
    return self._transform(self._source[index])


def make_eval_iterator(source: Any, cfg: Mapping[str, Any], *, batch_size: int,
                       process_index: int = 0,
                       process_count: int = 1) -> grain.DatasetIterator:
  """One deterministic pass over ``source`` in per-process batches of ``batch_size``.

  Example ``i`` goes to process ``i % P``; each process yields exactly
  ``num_eval_batches(len(source), batch_size, P)`` full batches
  ``{'image': float32 [b, H, W, 3], 'label': int32 [b, H, W], 'valid': bool
  [b, H, W]}`` with ``(H, W) = eval_pad_size(cfg)``, the missing tail filled
  with padding examples (image 0, label 255, valid False everywhere) that
  cannot change a confusion matrix.

  Raises (when the batch is read):
    ValueError: an image is larger than the pad size and
      ``dataset.eval_shrink_to_fit`` is False (names the file and both sizes).
  """
  validate_dataset_config(cfg)
  _check_sharding(batch_size, process_index, process_count)
  num_batches = num_eval_batches(len(source), batch_size, process_count)
  ds = grain.MapDataset.range(num_batches * batch_size)
  ds = ds.map(_EvalExample(source, eval_transform(cfg), process_index, process_count))
  return _finish(ds.batch(batch_size), cfg)
