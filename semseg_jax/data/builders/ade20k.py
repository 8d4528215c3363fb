"""ADE20K scene parsing (MIT SceneParsing benchmark, ADEChallengeData2016), 150 classes.

The data is ``ADEChallengeData2016.zip`` (public), taken from, in
order: ``manual_dir/ADEChallengeData2016/`` (extracted), ``manual_dir`` itself
holding the extracted folders, ``manual_dir/ADEChallengeData2016.zip``, or
downloaded from :data:`URL` when there is no manual_dir. The layout::

  images/training/ADE_train_00000001.jpg ...     20210 images
  images/validation/ADE_val_00000001.jpg ...     2000 images
  annotations/training/ADE_train_00000001.png    greyscale, raw ids 0..150
  annotations/validation/...

Each image is paired with the annotation of the same name. Raw 0 ("other
objects") becomes 255 = ignore; raw ``1..150`` become class ids ``0..149`` (the
order of the benchmark's ``objectInfo150``). Any other raw value is bad input.
Splits: ``train`` (20210), ``validation`` (2000).
"""
from __future__ import annotations

import os
from typing import Iterator

import tensorflow_datasets as tfds

from semseg_jax import data as data_lib
from semseg_jax.data.builders import base
from semseg_jax.data.builders.nyuv2 import shifted_label_map

# The 150 benchmark classes, raw ids 1..150 (objectInfo150 order, first name of each entry).
CLASS_NAMES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass',
    'cabinet', 'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain',
    'chair', 'car', 'water', 'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field',
    'armchair', 'seat', 'fence', 'desk', 'rock', 'wardrobe', 'lamp', 'bathtub', 'railing',
    'cushion', 'base', 'box', 'column', 'signboard', 'chest of drawers', 'counter', 'sand', 'sink',
    'skyscraper', 'fireplace', 'refrigerator', 'grandstand', 'path', 'stairs', 'runway', 'case',
    'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge', 'bookcase', 'blind',
    'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove', 'palm',
    'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus',
    'towel', 'light', 'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth',
    'television receiver', 'airplane', 'dirt track', 'apparel', 'pole', 'land', 'bannister',
    'escalator', 'ottoman', 'bottle', 'buffet', 'poster', 'stage', 'van', 'ship', 'fountain',
    'conveyer belt', 'canopy', 'washer', 'plaything', 'swimming pool', 'stool', 'barrel',
    'basket', 'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven', 'ball', 'food', 'step',
    'tank', 'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher', 'screen',
    'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan',
    'pier', 'crt screen', 'plate', 'monitor', 'bulletin board', 'shower', 'radiator', 'glass',
    'clock', 'flag')
assert len(CLASS_NAMES) == 150
# Class i is drawn in the VOC colour of raw id i + 1 (so no class is black).
PALETTE = base.voc_colormap(len(CLASS_NAMES), offset=1)

_ROOT = 'ADEChallengeData2016'
_ARCHIVE = _ROOT + '.zip'
URL = 'http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip'
_SPLITS = {'train': 'training', 'validation': 'validation'}  # TFDS split -> folder.


def find_root(dl_manager: tfds.download.DownloadManager) -> str:
  """The folder holding ``images/`` and ``annotations/`` (see the module docstring)."""
  manual = base.manual_dir_or_none(dl_manager)
  if manual is not None:
    if os.path.isdir(os.path.join(manual, _ROOT)):
      return os.path.join(manual, _ROOT)
    if not os.path.isfile(os.path.join(manual, _ARCHIVE)):
      return manual
    archive = os.path.join(manual, _ARCHIVE)
  else:
    archive = dl_manager.download(URL)
  extracted = base.extract_archive(
      archive, os.path.join(os.fspath(dl_manager.download_dir), 'extracted'))
  base.require_paths(extracted, [_ROOT], f'(inside {archive})')
  return os.path.join(extracted, _ROOT)


class Ade20k(base.SegmentationBuilder):
  """ADE20K / SceneParsing150: 20210 train, 2000 validation images."""

  name = 'ade20k'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release: ADEChallengeData2016, raw 0 -> ignore.'}
  CLASS_NAMES = CLASS_NAMES
  PALETTE = PALETTE
  HOMEPAGE = 'http://sceneparsing.csail.mit.edu/'
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Optional: the builder downloads {URL} itself. To use a local copy, put {_ARCHIVE} into
  manual_dir, or unzip it there, giving manual_dir/{_ROOT}/images/training/*.jpg and
  manual_dir/{_ROOT}/annotations/training/*.png (and validation/).
  """

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = find_root(dl_manager)
    base.require_paths(root, [f'{kind}/{folder}' for folder in _SPLITS.values()
                              for kind in ('images', 'annotations')],
                       f'(or put {_ARCHIVE} there; see '
                       f'{type(self).__name__}.MANUAL_DOWNLOAD_INSTRUCTIONS)')
    return {split: self._generate_examples(root, folder, split)
            for split, folder in _SPLITS.items()}

  def _generate_examples(self, root: str, folder: str, split: str
                         ) -> Iterator[tuple[str, dict]]:
    image_dir = os.path.join(root, 'images', folder)
    label_dir = os.path.join(root, 'annotations', folder)
    labels = {os.path.splitext(n)[0]: os.path.join(label_dir, n)
              for n in os.listdir(label_dir) if n.lower().endswith('.png')}
    table = shifted_label_map(len(CLASS_NAMES))
    for name in sorted(os.listdir(image_dir)):
      stem, ext = os.path.splitext(name)
      if ext.lower() not in ('.jpg', '.jpeg', '.png'):
        continue
      image_path = os.path.join(image_dir, name)
      label = labels.get(stem) or base.missing_label(image_path, os.path.join(label_dir, stem + '.png'))
      example = self.make_example(image_path, label, f'{folder}/{name}', label_map=table,
                                  split=split)
      if example is not None:
        yield example


data_lib.register_dataset('ade20k', base.dataset_info('ade20k', CLASS_NAMES, PALETTE))
