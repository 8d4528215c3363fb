"""SUN RGB-D builder: images and labels paired by id (not sorted position)."""
import os
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

import semseg_jax.data as data_lib
from semseg_jax.data.builders import base
from semseg_jax.data.builders import sunrgbd

# Test ids 1..5050, train ids 5051.. as in the real data. The test split's
# labels are zero-padded differently from its images (img-1.png vs
# img-000001.jpg) and an extra label without image sits in the folder, so a
# sorted-index pairing (pytorch-semseg's) would mislabel image 2.
NUMBERS = {'train': (5051, 5052, 5060), 'test': (1, 2, 10)}


def make_tree(root, flat=False):
  """Writes JPEGs and label PNGs; returns {file_name: raw label}.

  With ``flat`` all labels go to ``annotations/`` (the label archive's layout),
  else to ``annotations/<split>/``.
  """
  raws = {}
  for split, ids in NUMBERS.items():
    label_dir = os.path.join(root, 'annotations', *(() if flat else (split,)))
    os.makedirs(os.path.join(root, split), exist_ok=True)
    os.makedirs(label_dir, exist_ok=True)
    for n in ids:
      h, w = 10 + n % 7, 14 + n % 5
      image = np.random.default_rng(n).integers(0, 256, (h, w, 3)).astype(np.uint8)
      Image.fromarray(image).save(os.path.join(root, split, f'img-{n:06d}.jpg'))
      raw = np.random.default_rng(n + 7).integers(0, 38, (h, w)).astype(np.uint8)
      raw[0, 0], raw[0, 1] = 0, 37
      label_name = f'img-{n}.png' if split == 'test' else f'img-{n:06d}.png'
      Image.fromarray(raw, mode='L').save(os.path.join(label_dir, label_name))
      raws[f'{split}/img-{n:06d}.jpg'] = raw
  # A label with no image: sorts between img-1 and img-2 ('img-10.png' < 'img-2.png').
  Image.fromarray(np.zeros((3, 3), np.uint8), mode='L').save(
      os.path.join(root, 'annotations', *(() if flat else ('test',)), 'img-3.png'))
  return raws


def build(manual_dir, data_dir, **kwargs):
  builder = sunrgbd.Sunrgbd(data_dir=str(data_dir), **kwargs)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


@pytest.mark.parametrize('flat', [False, True])
def test_build_pairs_by_id(tmp_path, flat):
  raws = make_tree(tmp_path / 'raw', flat)
  builder = build(tmp_path / 'raw', tmp_path / 'data')
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {'train': 3, 'test': 3}
  seen = set()
  for split in NUMBERS:
    source = data_lib.get_source({'name': 'sunrgbd'}, split, data_dir=str(tmp_path / 'data'))
    for i in range(len(source)):
      record = source[i]
      name = record['file_name'].decode()
      raw = raws[name]
      np.testing.assert_array_equal(record['label'][..., 0],
                                    np.where(raw == 0, 255, raw.astype(int) - 1))
      assert record['label'][0, 0, 0] == 255 and record['label'][0, 1, 0] == 36
      seen.add(name)
  assert seen == set(raws)
  assert 'tensorflow' not in sys.modules


def test_info():
  info = data_lib.get_dataset_info('sunrgbd')
  assert info.num_classes == 37 and info.class_names[0] == 'wall' and info.class_names[-1] == 'bag'
  assert builder_metadata_names() == list(info.class_names)


def builder_metadata_names():
  return list(sunrgbd.Sunrgbd(data_dir='/nonexistent').info.metadata['class_names'])


def test_missing_label_and_bad_value(tmp_path):
  make_tree(tmp_path / 'raw')
  os.remove(tmp_path / 'raw' / 'annotations' / 'train' / 'img-005052.png')
  with pytest.raises(base.BadInputError, match=r'img-005052\.jpg: no label file'):
    build(tmp_path / 'raw', tmp_path / 'data')
  builder = build(tmp_path / 'raw', tmp_path / 'data2', skip_bad=True)
  assert builder.skipped == {'train': 1}
  make_tree(tmp_path / 'raw2')
  raw = np.full((16, 14), 38, np.uint8)  # Image 5060 is 16 x 14 (H x W).
  Image.fromarray(raw, mode='L').save(tmp_path / 'raw2' / 'annotations' / 'train' /
                                      'img-005060.png')
  with pytest.raises(base.BadInputError, match=r'img-005060\.png: raw label values \[38\]'):
    build(tmp_path / 'raw2', tmp_path / 'data3')


def test_missing_folders_listed(tmp_path):
  os.makedirs(tmp_path / 'raw' / 'train')
  with pytest.raises(FileNotFoundError, match=r'missing in manual_dir=.*: test, annotations \('):
    build(tmp_path / 'raw', tmp_path / 'data')
