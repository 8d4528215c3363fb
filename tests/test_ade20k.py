"""ADE20K builder: a tiny ADEChallengeData2016 tree -> ArrayRecord -> get_source / grain."""
import os
import sys
import zipfile

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

import semseg_jax.data as data_lib
from semseg_jax.data import pipeline
from semseg_jax.data.builders import ade20k
from semseg_jax.data.builders import base

ROOT = 'ADEChallengeData2016'
# (split folder, image stem, (H, W)); train has 3 images, validation 2.
FILES = [('training', 'ADE_train_00000001', (24, 32)), ('training', 'ADE_train_00000002', (20, 20)),
         ('training', 'ADE_train_00000007', (16, 28)), ('validation', 'ADE_val_00000001', (24, 24)),
         ('validation', 'ADE_val_00000002', (18, 30))]


def _raw_label(h, w, seed):
  """Raw ids 0..150 with every corner set: 0 (other), 1, 150, and a random interior."""
  raw = np.random.default_rng(seed).integers(0, 151, (h, w)).astype(np.uint8)
  raw[0, 0], raw[0, -1], raw[-1, 0] = 0, 1, 150
  return raw


def make_tree(root, files=FILES):
  """Writes JPEG images and greyscale PNG annotations; returns {file_name: raw label}."""
  raws = {}
  for i, (folder, stem, (h, w)) in enumerate(files):
    for kind in ('images', 'annotations'):
      os.makedirs(os.path.join(root, ROOT, kind, folder), exist_ok=True)
    image = np.random.default_rng(i).integers(0, 256, (h, w, 3)).astype(np.uint8)
    Image.fromarray(image).save(os.path.join(root, ROOT, 'images', folder, stem + '.jpg'))
    raws[f'{folder}/{stem}.jpg'] = raw = _raw_label(h, w, 100 + i)
    Image.fromarray(raw, mode='L').save(os.path.join(root, ROOT, 'annotations', folder,
                                                     stem + '.png'))
  return raws


def build(manual_dir, data_dir, **kwargs):
  builder = ade20k.Ade20k(data_dir=str(data_dir), **kwargs)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def _by_name(source):
  records = [source[i] for i in range(len(source))]
  return {r['file_name'].decode() if isinstance(r['file_name'], bytes) else r['file_name']: r
          for r in records}


def test_build_and_read_back(tmp_path):
  raws = make_tree(tmp_path / 'raw')
  build(tmp_path / 'raw', tmp_path / 'data')
  sizes = {}
  for split in ('train', 'validation'):
    source = data_lib.get_source({'name': 'ade20k'}, split, data_dir=str(tmp_path / 'data'))
    sizes[split] = len(source)
    for name, record in _by_name(source).items():
      raw = raws[name]
      label = np.asarray(record['label'])[..., 0]
      assert record['image'].shape == raw.shape + (3,) and record['image'].dtype == np.uint8
      # Reference mapping: 0 -> 255, k -> k - 1.
      expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
      np.testing.assert_array_equal(label, expected)
      assert label[0, 0] == 255 and label[0, -1] == 0 and label[-1, 0] == 149
  assert sizes == {'train': 3, 'validation': 2}
  assert 'tensorflow' not in sys.modules


def test_grain_eval_pipeline(tmp_path):
  raws = make_tree(tmp_path / 'raw')
  build(tmp_path / 'raw', tmp_path / 'data')
  source = data_lib.get_source({'name': 'ade20k'}, 'validation', data_dir=str(tmp_path / 'data'))
  cfg = pipeline.default_dataset_config()
  cfg.name, cfg.image_size, cfg.prefetch = 'ade20k', (32, 32), 0
  batch = next(iter(pipeline.make_eval_iterator(source, cfg, batch_size=2)))
  labels = np.asarray(batch['label'])
  assert labels.shape == (2, 32, 32)
  # Padding to 32x32 adds ignore pixels only; the class pixel counts survive.
  wanted = sum(np.bincount(np.where(r == 0, 255, r - 1).ravel(), minlength=256)
               for n, r in raws.items() if n.startswith('validation'))
  got = np.bincount(labels.ravel(), minlength=256)
  np.testing.assert_array_equal(got[:150], wanted[:150])


def test_info_registered_without_data():
  info = data_lib.get_dataset_info('ade20k')
  assert info.num_classes == 150 and info.ignore_index == 255
  assert info.class_names[:3] == ('wall', 'building', 'sky') and info.class_names[-1] == 'flag'
  assert len(set(map(tuple, info.palette.tolist()))) == 150  # Colours tell classes apart.


def test_bad_value_names_file_and_skip_bad_counts(tmp_path):
  make_tree(tmp_path / 'raw')
  bad = os.path.join(tmp_path, 'raw', ROOT, 'annotations', 'training', 'ADE_train_00000002.png')
  raw = np.full((20, 20), 3, np.uint8)
  raw[5, 5] = 151
  Image.fromarray(raw, mode='L').save(bad)
  with pytest.raises(base.BadInputError, match=r'ADE_train_00000002\.png: raw label values '
                     r'\[151\] have no class'):
    build(tmp_path / 'raw', tmp_path / 'data')
  builder = build(tmp_path / 'raw', tmp_path / 'data2', skip_bad=True)
  assert builder.skipped == {'train': 1}
  assert builder.info.splits['train'].num_examples == 2


def test_missing_label_and_truncated_image(tmp_path):
  make_tree(tmp_path / 'raw')
  os.remove(os.path.join(tmp_path, 'raw', ROOT, 'annotations', 'validation',
                         'ADE_val_00000002.png'))
  with pytest.raises(base.BadInputError, match=r'ADE_val_00000002\.jpg: no label file; '
                     r'expected .*ADE_val_00000002\.png'):
    build(tmp_path / 'raw', tmp_path / 'data')
  make_tree(tmp_path / 'raw2')
  image = os.path.join(tmp_path, 'raw2', ROOT, 'images', 'training', 'ADE_train_00000007.jpg')
  with open(image, 'rb') as f:
    head = f.read(200)
  with open(image, 'wb') as f:
    f.write(head)
  with pytest.raises(base.BadInputError, match=r'ADE_train_00000007\.jpg: unreadable image'):
    build(tmp_path / 'raw2', tmp_path / 'data2')


def test_wrong_label_size(tmp_path):
  make_tree(tmp_path / 'raw')
  path = os.path.join(tmp_path, 'raw', ROOT, 'annotations', 'training', 'ADE_train_00000001.png')
  Image.fromarray(np.ones((10, 10), np.uint8), mode='L').save(path)
  with pytest.raises(base.BadInputError, match=r'ADE_train_00000001\.png: label size 10x10'):
    build(tmp_path / 'raw', tmp_path / 'data')


def test_missing_folders_listed(tmp_path):
  os.makedirs(tmp_path / 'raw' / ROOT / 'images' / 'training')
  with pytest.raises(FileNotFoundError) as e:
    build(tmp_path / 'raw', tmp_path / 'data')
  message = str(e.value)
  for path in ('images/validation', 'annotations/training', 'annotations/validation'):
    assert path in message
  assert 'images/training,' not in message and ROOT in message


def test_not_prepared_error(tmp_path):
  with pytest.raises(data_lib.DatasetNotFoundError, match="'ade20k' is not prepared"):
    data_lib.get_source({'name': 'ade20k'}, 'train', data_dir=str(tmp_path))


def _zip_tree(src, archive):
  with zipfile.ZipFile(archive, 'w') as z:
    for folder, _, names in os.walk(src):
      for name in names:
        path = os.path.join(folder, name)
        z.write(path, os.path.relpath(path, src))


def test_archive_in_manual_dir_and_download(tmp_path, monkeypatch):
  raws = make_tree(tmp_path / 'tree')
  manual = tmp_path / 'manual'
  os.makedirs(manual)
  _zip_tree(tmp_path / 'tree', manual / 'ADEChallengeData2016.zip')
  builder = ade20k.Ade20k(data_dir=str(tmp_path / 'data'))
  builder.download_and_prepare(download_dir=str(tmp_path / 'dl'),
                               download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  assert builder.info.splits['train'].num_examples == 3

  urls = []

  def fake_download(self, url):  # No network in tests: "download" the local zip.
    urls.append(url)
    return str(manual / 'ADEChallengeData2016.zip')

  monkeypatch.setattr(tfds.download.DownloadManager, 'download', fake_download)
  builder = ade20k.Ade20k(data_dir=str(tmp_path / 'data2'))
  builder.download_and_prepare(download_dir=str(tmp_path / 'dl2'))
  assert urls == [ade20k.URL]
  records = _by_name(data_lib.get_source({'name': 'ade20k'}, 'validation',
                                         data_dir=str(tmp_path / 'data2')))
  assert sorted(records) == sorted(n for n in raws if n.startswith('validation'))
