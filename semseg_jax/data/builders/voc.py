"""PASCAL VOC 2012 segmentation (+ SBD for ``train_aug``), TFDS builder ``voc2012``.

Splits: ``train`` (1464), ``validation`` (1449) and ``train_aug`` (10582: VOC
train ∪ SBD train ∪ SBD val, minus VOC val; the VOC label is used where VOC
has one, the SBD ``.mat`` otherwise). 21 classes; the 255 "void" border of the
VOC palette PNGs stays 255 = ignore (it is never background). SBD labels
(``GTcls.Segmentation``, uint8 0..20) have no border.

Raw data, each looked up in this order: the extracted folder in
``manual_dir`` (``VOCdevkit/VOC2012``, ``benchmark_RELEASE``), the archive in
``manual_dir`` (``VOCtrainval_11-May-2012.tar``, ``benchmark.tgz``), else the
archive is downloaded from its official URL.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from semseg_jax import data as data_lib
from semseg_jax.data.builders import base

VOC_URL = 'http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar'
SBD_URL = ('http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/'
           'semantic_contours/benchmark.tgz')
VOC_ARCHIVE = 'VOCtrainval_11-May-2012.tar'
SBD_ARCHIVE = 'benchmark.tgz'
VOC_FOLDER = 'VOCdevkit/VOC2012'
SBD_FOLDER = 'benchmark_RELEASE'

CLASS_NAMES = ('background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car',
               'cat', 'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person',
               'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor')


PALETTE = base.voc_colormap(len(CLASS_NAMES))

_INSTRUCTIONS = f"""\
Optional (otherwise both are downloaded): put in manual_dir either the
extracted folders or the archives:
  {VOC_FOLDER}/  or  {VOC_ARCHIVE}   ({VOC_URL})
  {SBD_FOLDER}/  or  {SBD_ARCHIVE}   ({SBD_URL}; only for train_aug)
"""


def _read_ids(path: str) -> list[str]:
  with open(path) as f:
    return [line.split()[0] for line in f if line.strip()]


def _sbd_loader(path: str) -> Callable[[], np.ndarray]:
  """A function reading ``GTcls.Segmentation`` from an SBD ``cls/*.mat`` file."""

  def load() -> np.ndarray:
    try:
      from scipy import io as sio  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError('reading SBD .mat labels (voc2012 train_aug) needs scipy: '
                        'pip install scipy') from None
    try:
      mat = sio.loadmat(path, squeeze_me=True, struct_as_record=False)
      return np.asarray(mat['GTcls'].Segmentation)
    except Exception as e:  # pylint: disable=broad-except  # scipy's MatReadError & co.
      raise base.BadInputError(
          f'{path}: unreadable SBD label (GTcls.Segmentation): {base.one_line(e)}'
      ) from None

  return load


def _extract_dir(dl_manager: Any) -> str:
  return os.path.join(os.fspath(dl_manager.download_dir), 'extracted')


class Voc2012(base.SegmentationBuilder):
  """PASCAL VOC 2012 semantic segmentation with the SBD ``train_aug`` split."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'train, validation, train_aug (VOC + SBD).'}
  CLASS_NAMES = CLASS_NAMES
  PALETTE = PALETTE
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  HOMEPAGE = 'http://host.robots.ox.ac.uk/pascal/VOC/voc2012/'

  def __init__(self, *, sbd: bool = True, **kwargs):
    """Args: sbd: also build ``train_aug`` (needs SBD); **kwargs: see the base."""
    super().__init__(**kwargs)
    self.sbd = sbd

  def _locate(self, dl_manager, manual: str | None, folder: str, archive: str, url: str) -> str:
    """The extracted ``folder``: from manual_dir, its archive there, or downloaded."""
    if manual is not None:
      if os.path.isdir(os.path.join(manual, folder)):
        return os.path.join(manual, folder)
      if os.path.isfile(os.path.join(manual, archive)):
        root = base.extract_archive(os.path.join(manual, archive), _extract_dir(dl_manager))
        base.require_paths(root, [folder], f'(inside {archive})')
        return os.path.join(root, folder)
    logging.info('%s: no %s/ or %s in manual_dir=%s; downloading %s', self.name, folder,
                 archive, manual, url)
    root = base.extract_archive(dl_manager.download(url), _extract_dir(dl_manager))
    base.require_paths(root, [folder], f'(inside the archive downloaded from {url})')
    return os.path.join(root, folder)

  def _split_generators(self, dl_manager):
    manual = base.manual_dir_or_none(dl_manager)
    voc = self._locate(dl_manager, manual, VOC_FOLDER, VOC_ARCHIVE, VOC_URL)
    sets = os.path.join('ImageSets', 'Segmentation')
    base.require_paths(voc, ['JPEGImages', 'SegmentationClass', os.path.join(sets, 'train.txt'),
                             os.path.join(sets, 'val.txt')])
    train = _read_ids(os.path.join(voc, sets, 'train.txt'))
    val = _read_ids(os.path.join(voc, sets, 'val.txt'))
    voc_pairs = lambda ids: [(os.path.join(voc, 'JPEGImages', f'{i}.jpg'),
                              os.path.join(voc, 'SegmentationClass', f'{i}.png'), i)
                             for i in ids]
    splits = {'train': self._generate_examples(voc_pairs(train), 'train'),
              'validation': self._generate_examples(voc_pairs(val), 'validation')}
    if self.sbd:
      sbd = os.path.join(self._locate(dl_manager, manual, SBD_FOLDER, SBD_ARCHIVE, SBD_URL),
                         'dataset')
      base.require_paths(sbd, ['cls', 'train.txt', 'val.txt'], f'(SBD, in {SBD_FOLDER}/dataset)')
      sbd_ids = set(_read_ids(os.path.join(sbd, 'train.txt')))
      sbd_ids |= set(_read_ids(os.path.join(sbd, 'val.txt')))
      aug = sorted((set(train) | sbd_ids) - set(val))
      train_set = set(train)
      pairs = []
      for i in aug:
        image = os.path.join(voc, 'JPEGImages', f'{i}.jpg')
        if not os.path.exists(image):  # SBD ships its own copy of the images.
          image = os.path.join(sbd, 'img', f'{i}.jpg')
        # VOC labels win: finer, and with the void border kept as ignore.
        if i in train_set:
          label = os.path.join(voc, 'SegmentationClass', f'{i}.png')
        else:
          label = _sbd_loader(os.path.join(sbd, 'cls', f'{i}.mat'))
        pairs.append((image, label, i))
      splits['train_aug'] = self._generate_examples(pairs, 'train_aug')
    return splits

  def _generate_examples(self, pairs, split):
    for image, label, name in pairs:
      example = self.make_example(image, label, name, split=split)
      if example is not None:
        yield example


data_lib.register_dataset('voc2012', base.dataset_info('voc2012', CLASS_NAMES, PALETTE))
