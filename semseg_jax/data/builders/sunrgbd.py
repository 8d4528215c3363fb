"""SUN RGB-D semantic segmentation (37 classes), pytorch-semseg's layout, paired by id.

``manual_dir`` holds ``SUNRGBD-{train,test}_images.tgz``
(http://www.doc.ic.ac.uk/~ahanda/) and the labels of
github.com/ankurhanda/sunrgbd-meta-data (``sunrgbd_train_test_labels.tar.gz``),
extracted as::

  train/img-005051.jpg ...              5285 images
  test/img-000001.jpg ...               5050 images
  annotations/train/img-005051.png ...  raw ids 0..37 (0 = unlabelled)
  annotations/test/img-000001.png ...

or with all 10335 label PNGs directly in ``annotations/`` (as the label
archive ships them). Images and labels are paired by the number at the end of their names
(``005051``). pytorch-semseg zips the two sorted file lists instead, which
silently mislabels every image after the first one missing or extra; here a
missing label is bad input. Raw 0 becomes 255 = ignore, raw ``1..37`` become
class ids ``0..36``. Splits: ``train`` (5285) and ``test`` (5050, the split
papers evaluate on; there is no separate validation split).
"""
from __future__ import annotations

import os
from typing import Iterator

import tensorflow_datasets as tfds

from semseg_jax import data as data_lib
from semseg_jax.data.builders import base
from semseg_jax.data.builders.nyuv2 import CLASS_NAMES_40, index_by_number, shifted_label_map

# The 37 SUN RGB-D classes (raw ids 1..37) are the first 37 of NYUv2's 40.
CLASS_NAMES = CLASS_NAMES_40[:37]
PALETTE = base.voc_colormap(len(CLASS_NAMES), offset=1)  # pytorch-semseg's colours of raw ids.

_SPLITS = {'train': 'train', 'test': 'test'}  # TFDS split -> folder.


class Sunrgbd(base.SegmentationBuilder):
  """SUN RGB-D 37-class segmentation: 5285 train / 5050 test."""

  name = 'sunrgbd'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release: images and labels paired by id.'}
  CLASS_NAMES = CLASS_NAMES
  PALETTE = PALETTE
  HOMEPAGE = 'https://rgbd.cs.princeton.edu/'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download SUNRGBD-train_images.tgz and SUNRGBD-test_images.tgz
  (http://www.doc.ic.ac.uk/~ahanda/) and sunrgbd_train_test_labels.tar.gz
  (github.com/ankurhanda/sunrgbd-meta-data); extract the images to manual_dir/train/ and
  manual_dir/test/ and all label PNGs to manual_dir/annotations/ (or per split to
  manual_dir/annotations/train/ and manual_dir/annotations/test/).
  """

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    expected = list(_SPLITS.values()) + ['annotations']
    root = base.require_manual_dir(dl_manager, expected)
    base.require_paths(root, expected, f'(see {type(self).__name__}.MANUAL_DOWNLOAD_INSTRUCTIONS)')
    return {split: self._generate_examples(root, folder, split)
            for split, folder in _SPLITS.items()}

  def _generate_examples(self, root: str, folder: str, split: str
                         ) -> Iterator[tuple[str, dict]]:
    images = index_by_number(os.path.join(root, folder), ('.jpg', '.jpeg', '.png'))
    label_dir = os.path.join(root, 'annotations', folder)
    if not os.path.isdir(label_dir):  # One flat folder with the labels of both splits.
      label_dir = os.path.join(root, 'annotations')
    labels = index_by_number(label_dir, ('.png',))
    table = shifted_label_map(len(CLASS_NAMES))
    for number, image_path in images.items():
      stem = os.path.splitext(os.path.basename(image_path))[0]
      label = labels.get(number) or base.missing_label(image_path,
                                                  os.path.join(label_dir, stem + '.png'))
      example = self.make_example(image_path, label, f'{folder}/{os.path.basename(image_path)}',
                                  label_map=table, split=split)
      if example is not None:
        yield example


data_lib.register_dataset('sunrgbd', base.dataset_info('sunrgbd', CLASS_NAMES, PALETTE))
