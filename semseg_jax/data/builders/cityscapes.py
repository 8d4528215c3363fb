"""Cityscapes (fine annotations), TFDS builder ``cityscapes``.

Labels are the 19 evaluated classes (train ids 0..18, road .. bicycle) mapped
from the ``*_gtFine_labelIds.png`` files with the official labelId -> trainId
table of cityscapesScripts; every other labelId (void, ego vehicle, parking,
guard rail, caravan, ...) becomes 255 = ignore. Splits ``train`` (2975),
``validation`` (500) and ``test`` (1525; labels are not public, so all 255).

Raw data in ``manual_dir`` (register at https://www.cityscapes-dataset.com):
the two official archives ``leftImg8bit_trainvaltest.zip`` and
``gtFine_trainvaltest.zip`` (read in place, not extracted) or the folders
``leftImg8bit/`` and ``gtFine/`` extracted from them.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator
import zipfile

import numpy as np
import tensorflow_datasets as tfds

from semseg_jax import data as data_lib
from semseg_jax.data.builders import base

CLASS_NAMES = ('road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light',
               'traffic sign', 'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck',
               'bus', 'train', 'motorcycle', 'bicycle')
PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32)], np.uint8)

# labelId -> trainId for labelIds 0..33 (cityscapesScripts `labels.py`; ids
# whose trainId is 255 or -1 there are ignored here). labelIds above 33 do not
# exist (license plate is -1 and never appears in the uint8 PNGs): an error.
LABEL_ID_TO_TRAIN_ID = np.array([
    255, 255, 255, 255, 255, 255, 255,  # 0-6: unlabeled, ego vehicle, rectification
                                        # border, out of roi, static, dynamic, ground
    0, 1,  # 7 road, 8 sidewalk
    255, 255,  # 9 parking, 10 rail track
    2, 3, 4,  # 11 building, 12 wall, 13 fence
    255, 255, 255,  # 14 guard rail, 15 bridge, 16 tunnel
    5,  # 17 pole
    255,  # 18 polegroup
    6, 7, 8, 9, 10, 11, 12, 13, 14, 15,  # 19 traffic light .. 28 bus
    255, 255,  # 29 caravan, 30 trailer
    16, 17, 18,  # 31 train, 32 motorcycle, 33 bicycle
], np.int16)
assert len(LABEL_ID_TO_TRAIN_ID) == 34

IMAGES_ZIP = 'leftImg8bit_trainvaltest.zip'
LABELS_ZIP = 'gtFine_trainvaltest.zip'
SPLITS = {'train': 'train', 'validation': 'val', 'test': 'test'}  # TFDS name -> folder.

_INSTRUCTIONS = f"""\
Register at https://www.cityscapes-dataset.com and download {IMAGES_ZIP} and
{LABELS_ZIP}. Put both zips in manual_dir (they are read in place), or the
folders leftImg8bit/ and gtFine/ extracted from them.
"""


class _Tree:
  """Files under ``leftImg8bit/`` and ``gtFine/``, from folders or the official zips."""

  def __init__(self, root: str, stack: contextlib.ExitStack):
    self.root = root
    self._zips: dict[str, zipfile.ZipFile] = {}
    self.names: set[str] = set()
    missing = []
    for folder, archive in (('leftImg8bit', IMAGES_ZIP), ('gtFine', LABELS_ZIP)):
      if os.path.isdir(os.path.join(root, folder)):
        for dirpath, _, files in os.walk(os.path.join(root, folder)):
          rel = os.path.relpath(dirpath, root).replace(os.sep, '/')
          self.names.update(f'{rel}/{f}' for f in files)
      elif os.path.isfile(os.path.join(root, archive)):
        try:
          z = stack.enter_context(zipfile.ZipFile(os.path.join(root, archive)))
        except (OSError, zipfile.BadZipFile) as e:
          raise base.BadInputError(f'{os.path.join(root, archive)}: unreadable zip '
                                   f'({base.one_line(e)})') from None
        for name in z.namelist():
          if name.startswith(folder + '/') and not name.endswith('/'):
            self._zips[name] = z
            self.names.add(name)
      else:
        missing.append(f'{folder}/ (or {archive})')
    if missing:
      raise FileNotFoundError(f'missing in manual_dir={root}: {", ".join(missing)}')

  def where(self, name: str) -> str:
    """The file's location for messages."""
    if name in self._zips:
      return f'{self._zips[name].filename}:{name}'
    return os.path.join(self.root, name)

  def image(self, name: str) -> bytes | str:
    if name in self._zips:
      return self._zips[name].read(name)
    return os.path.join(self.root, name)

  def label(self, name: str) -> Callable[[], Any]:
    """Lazily read: a missing or broken label is a skippable bad example."""

    def load():
      if name not in self.names:
        raise base.BadInputError(f'{self.where(name)}: missing label file for image '
                                 f'{name.replace("gtFine", "leftImg8bit", 1)}')
      return self.image(name)

    return load


class Cityscapes(base.SegmentationBuilder):
  """Cityscapes fine annotations, 19 train ids."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'train / validation / test, 19 trainIds, rest 255.'}
  CLASS_NAMES = CLASS_NAMES
  PALETTE = PALETTE
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  HOMEPAGE = 'https://www.cityscapes-dataset.com'

  def _split_generators(self, dl_manager):
    root = base.require_manual_dir(
        dl_manager, [f'leftImg8bit/ (or {IMAGES_ZIP})', f'gtFine/ (or {LABELS_ZIP})'])
    with contextlib.ExitStack() as stack:
      names = _Tree(root, stack).names
    missing = [f'{top}/{folder}/' for top in ('leftImg8bit', 'gtFine')
               for folder in ('train', 'val')
               if not any(n.startswith(f'{top}/{folder}/') for n in names)]
    if missing:
      raise FileNotFoundError(f'missing in manual_dir={root}: {", ".join(missing)} '
                              '(no files there)')
    splits = {'train': self._generate_examples(root, 'train'),
              'validation': self._generate_examples(root, 'validation')}
    if any(n.startswith('leftImg8bit/test/') for n in names):
      splits['test'] = self._generate_examples(root, 'test')
    return splits

  def _generate_examples(self, root: str, split: str) -> Iterator[tuple[str, dict]]:
    folder = SPLITS[split]
    with contextlib.ExitStack() as stack:
      tree = _Tree(root, stack)
      images = sorted(n for n in tree.names if n.startswith(f'leftImg8bit/{folder}/')
                      and n.endswith('_leftImg8bit.png'))
      for name in images:
        city, file = name.split('/')[2:]
        stem = file[:-len('_leftImg8bit.png')]
        label_name = f'gtFine/{folder}/{city}/{stem}_gtFine_labelIds.png'
        labelled = split != 'test'  # Test labels are not public (the zip's are blank).
        example = self.make_example(
            tree.image(name), tree.label(label_name) if labelled else None, stem,
            label_map=LABEL_ID_TO_TRAIN_ID if labelled else None, split=split,
            label_name=tree.where(label_name), image_name=tree.where(name))
        if example is not None:
          yield example


data_lib.register_dataset('cityscapes', base.dataset_info('cityscapes', CLASS_NAMES, PALETTE))
