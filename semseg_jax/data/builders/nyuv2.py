"""NYU Depth v2 semantic segmentation (13 or 40 classes), pytorch-semseg's PNG layout.

``manual_dir`` holds (the archives of github.com/ankurhanda/nyuv2-meta-data
and ``nyu_{train,test}_rgb.tgz``, extracted)::

  train/        795 RGB PNGs, e.g. nyu_rgb_0003.png
  test/         654 RGB PNGs
  train_annot/  new_nyu_class13_0003.png (and/or ..._class40_0003.png)
  test_annot/

Images and labels are paired by the number at the end of their names
(``0003``), never by sorted position. Raw label 0 ("unknown") becomes 255 =
ignore and raw ``1..K`` become class ids ``0..K-1``. Builder configs
``class13`` (default, registry name ``nyuv2``) and ``class40`` (registry name
``nyuv2_40``). The official test split is named ``test``; there is no
separate validation split (set ``dataset.eval_split='test'``).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from semseg_jax import data as data_lib
from semseg_jax.data.builders import base

# Class names of the 13-class NYUv2 labels (raw ids 1..13), in id order.
CLASS_NAMES_13 = ('bed', 'books', 'ceiling', 'chair', 'floor', 'furniture', 'objects',
                  'picture', 'sofa', 'table', 'tv', 'wall', 'window')
# The 40 classes of Gupta et al. (raw ids 1..40); SUN-RGBD uses the first 37.
CLASS_NAMES_40 = ('wall', 'floor', 'cabinet', 'bed', 'chair', 'sofa', 'table', 'door', 'window',
                  'bookshelf', 'picture', 'counter', 'blinds', 'desk', 'shelves', 'curtain',
                  'dresser', 'pillow', 'mirror', 'floor mat', 'clothes', 'ceiling', 'books',
                  'refrigerator', 'television', 'paper', 'towel', 'shower curtain', 'box',
                  'whiteboard', 'person', 'night stand', 'toilet', 'sink', 'lamp', 'bathtub',
                  'bag', 'otherstructure', 'otherfurniture', 'otherprop')

_SPLITS = {'train': 'train', 'test': 'test'}  # TFDS split -> folder.


def shifted_label_map(num_classes: int) -> np.ndarray:
  """Raw -> class id table for labels with 0 = unlabelled: 0 -> 255, 1..K -> 0..K-1, else -1."""
  table = np.full(256, -1, np.int64)
  table[0] = base.IGNORE
  table[1:num_classes + 1] = np.arange(num_classes)
  return table


_TRAILING_NUMBER = re.compile(r'(\d+)$')


def index_by_number(folder: str, suffixes: tuple[str, ...], pattern: re.Pattern[str] | None = None
                    ) -> dict[int, str]:
  """Files in ``folder`` keyed by the integer at the end of their stem (``img-000042`` -> 42).

  Args:
    folder: directory to list (not recursive).
    suffixes: accepted lower-case file extensions, e.g. ``('.png',)``.
    pattern: optional regex whose group 1 is the number; files not matching
      it are ignored (default: the trailing digits of the stem).

  Raises:
    base.BadInputError: two files carry the same number.
  """
  found: dict[int, str] = {}
  for name in sorted(os.listdir(folder)):
    stem, ext = os.path.splitext(name)
    if ext.lower() not in suffixes:
      continue
    match = (pattern or _TRAILING_NUMBER).search(name if pattern else stem)
    if not match:
      continue
    number = int(match.group(1))
    if number in found:
      raise base.BadInputError(f'{os.path.join(folder, name)}: same number {number} as '
                               f'{found[number]}; cannot pair images and labels by number')
    found[number] = os.path.join(folder, name)
  return found


@dataclasses.dataclass
class Nyuv2Config(tfds.core.BuilderConfig):
  """``num_classes``: 13 or 40, the label set (``new_nyu_class{K}_NNNN.png`` files)."""
  num_classes: int = 13


class Nyuv2(base.SegmentationBuilder):
  """NYUv2 RGB images with 13- or 40-class labels; 795 train / 654 test."""

  name = 'nyuv2'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release: pytorch-semseg PNG layout, paired by number.'}
  BUILDER_CONFIGS = [
      Nyuv2Config(name='class13', description='13 classes (Handa et al.)', num_classes=13),
      Nyuv2Config(name='class40', description='40 classes (Gupta et al.)', num_classes=40),
  ]
  DEFAULT_CONFIG_NAME = 'class13'
  HOMEPAGE = 'https://cs.nyu.edu/~silberman/datasets/nyu_depth_v2.html'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download nyu_train_rgb.tgz and nyu_test_rgb.tgz (http://www.doc.ic.ac.uk/~ahanda/) and the
  label archives of github.com/ankurhanda/nyuv2-meta-data (train_labels_13/, test_labels_13/,
  or the 40-class ones), and extract them into manual_dir as
  train/*.png, test/*.png, train_annot/new_nyu_class13_NNNN.png, test_annot/...
  """

  @property
  def CLASS_NAMES(self) -> tuple[str, ...]:  # pylint: disable=invalid-name
    return CLASS_NAMES_13 if self.builder_config.num_classes == 13 else CLASS_NAMES_40

  @property
  def PALETTE(self) -> np.ndarray:  # pylint: disable=invalid-name
    return base.voc_colormap(self.builder_config.num_classes, offset=1)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    expected = [p for s in _SPLITS.values() for p in (s, f'{s}_annot')]
    root = base.require_manual_dir(dl_manager, expected)
    base.require_paths(root, expected, f'(see {type(self).__name__}.MANUAL_DOWNLOAD_INSTRUCTIONS)')
    return {split: self._generate_examples(root, folder, split)
            for split, folder in _SPLITS.items()}

  def _generate_examples(self, root: str, folder: str, split: str
                         ) -> Iterator[tuple[str, dict]]:
    k = self.builder_config.num_classes
    images = index_by_number(os.path.join(root, folder), ('.png', '.jpg'))
    label_dir = os.path.join(root, f'{folder}_annot')
    labels = index_by_number(label_dir, ('.png',), re.compile(rf'class{k}_(\d+)\.png$'))
    if images and not labels:
      raise FileNotFoundError(f'no {k}-class labels (new_nyu_class{k}_NNNN.png) in {label_dir}')
    table = shifted_label_map(k)
    for number, image_path in images.items():
      label = labels.get(number) or base.missing_label(
          image_path, os.path.join(label_dir, f'new_nyu_class{k}_{number:04d}.png'))
      example = self.make_example(image_path, label, f'{folder}/{os.path.basename(image_path)}',
                                  label_map=table, split=split)
      if example is not None:
        yield example


data_lib.register_dataset('nyuv2', base.dataset_info('nyuv2', CLASS_NAMES_13,
                                                     base.voc_colormap(13, offset=1)),
                          tfds_name='nyuv2/class13')
data_lib.register_dataset('nyuv2_40', base.dataset_info('nyuv2_40', CLASS_NAMES_40,
                                                        base.voc_colormap(40, offset=1)),
                          tfds_name='nyuv2/class40')
