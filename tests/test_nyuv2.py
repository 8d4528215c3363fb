"""NYUv2 builder (13/40-class configs): a tiny pytorch-semseg PNG tree -> ArrayRecord -> read."""
import os
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

import semseg_jax.data as data_lib
from semseg_jax.data.builders import base
from semseg_jax.data.builders import nyuv2

# Image numbers per split, with gaps (as in the real data: train and test
# images interleave in NYU's 1449-image numbering).
NUMBERS = {'train': (3, 5, 10), 'test': (1, 2)}


def make_tree(root, classes=(13,), numbers=NUMBERS, palette_labels=False):
  """Writes RGB PNGs and new_nyu_class{K}_NNNN.png labels; returns {(K, file_name): raw}."""
  raws = {}
  for split, ids in numbers.items():
    os.makedirs(os.path.join(root, split), exist_ok=True)
    os.makedirs(os.path.join(root, f'{split}_annot'), exist_ok=True)
    for n in ids:
      h, w = 12 + n, 16 + 2 * n  # Every image has its own size: a mispairing shows.
      image = np.random.default_rng(n).integers(0, 256, (h, w, 3)).astype(np.uint8)
      Image.fromarray(image).save(os.path.join(root, split, f'nyu_rgb_{n:04d}.png'))
      for k in classes:
        raw = np.random.default_rng(1000 * k + n).integers(0, k + 1, (h, w)).astype(np.uint8)
        raw[0, 0], raw[0, 1], raw[1, 0] = 0, 1, k
        img = Image.fromarray(raw, mode='L')
        if palette_labels:  # Upstream labels may be palette PNGs: indices are the ids.
          img = Image.fromarray(raw, mode='P')
          img.putpalette(base.voc_colormap(256).ravel().tolist())
        img.save(os.path.join(root, f'{split}_annot', f'new_nyu_class{k}_{n:04d}.png'))
        raws[(k, f'{split}/nyu_rgb_{n:04d}.png')] = raw
  return raws


def build(manual_dir, data_dir, config='class13', **kwargs):
  builder = nyuv2.Nyuv2(data_dir=str(data_dir), config=config, **kwargs)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def _records(name, split, data_dir):
  source = data_lib.get_source({'name': name}, split, data_dir=str(data_dir))
  return {r['file_name'].decode(): r for r in (source[i] for i in range(len(source)))}


@pytest.mark.parametrize('k,name', [(13, 'nyuv2'), (40, 'nyuv2_40')])
def test_both_configs_pair_by_number(tmp_path, k, name):
  raws = make_tree(tmp_path / 'raw', classes=(13, 40), palette_labels=(k == 40))
  builder = build(tmp_path / 'raw', tmp_path / 'data', config=f'class{k}')
  for split, ids in NUMBERS.items():
    records = _records(name, split, tmp_path / 'data')
    assert sorted(records) == [f'{split}/nyu_rgb_{n:04d}.png' for n in ids]
    for file_name, record in records.items():
      raw = raws[(k, file_name)]
      label = record['label'][..., 0]
      np.testing.assert_array_equal(label, np.where(raw == 0, 255, raw.astype(int) - 1))
      assert record['image'].shape[:2] == raw.shape
      assert label[0, 0] == 255 and label[0, 1] == 0 and label[1, 0] == k - 1
  info = data_lib.get_dataset_info(name)
  assert info.num_classes == k
  assert builder.info.metadata['class_names'] == list(info.class_names)
  assert builder.info.metadata['palette'] == info.palette.tolist()
  assert 'tensorflow' not in sys.modules


def test_static_info():
  info13, info40 = data_lib.get_dataset_info('nyuv2'), data_lib.get_dataset_info('nyuv2_40')
  assert info13.class_names[0] == 'bed' and info13.class_names[-1] == 'window'
  assert info40.class_names[:2] == ('wall', 'floor') and info40.class_names[-1] == 'otherprop'
  # Class i keeps pytorch-semseg's colour of raw id i + 1 (VOC map: 1 -> (128, 0, 0)).
  np.testing.assert_array_equal(info13.palette[:3], [[128, 0, 0], [0, 128, 0], [128, 128, 0]])


def test_pascal_colormap_reference():
  def reference(c):  # Bit-by-bit, as the VOC devkit describes it.
    r = g = b = 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    return [r, g, b]

  np.testing.assert_array_equal(base.voc_colormap(256), [reference(c) for c in range(256)])


def test_missing_label_stops_or_is_skipped(tmp_path):
  make_tree(tmp_path / 'raw')
  os.remove(tmp_path / 'raw' / 'test_annot' / 'new_nyu_class13_0002.png')
  with pytest.raises(base.BadInputError, match=r'nyu_rgb_0002\.png: no label file; expected '
                     r'.*test_annot/new_nyu_class13_0002\.png'):
    build(tmp_path / 'raw', tmp_path / 'data')
  builder = build(tmp_path / 'raw', tmp_path / 'data2', skip_bad=True)
  assert builder.skipped == {'test': 1}
  assert builder.info.splits['test'].num_examples == 1


def test_value_out_of_range(tmp_path):
  make_tree(tmp_path / 'raw')
  raw = np.zeros((15, 22), np.uint8)
  raw[3, 3] = 14
  Image.fromarray(raw, mode='L').save(tmp_path / 'raw' / 'train_annot' / 'new_nyu_class13_0003.png')
  with pytest.raises(base.BadInputError, match=r'new_nyu_class13_0003\.png: raw label values '
                     r'\[14\] have no class'):
    build(tmp_path / 'raw', tmp_path / 'data')


def test_duplicate_numbers_rejected(tmp_path):
  make_tree(tmp_path / 'raw')
  Image.new('RGB', (4, 4)).save(tmp_path / 'raw' / 'train' / 'nyu_rgb_3.png')
  with pytest.raises(base.BadInputError, match='same number 3'):
    build(tmp_path / 'raw', tmp_path / 'data')


def test_missing_folders_and_label_set(tmp_path):
  os.makedirs(tmp_path / 'raw' / 'train')
  with pytest.raises(FileNotFoundError, match=r'missing in manual_dir=.*: train_annot, test, '
                     r'test_annot \(see Nyuv2'):
    build(tmp_path / 'raw', tmp_path / 'data')
  make_tree(tmp_path / 'raw13', classes=(13,))
  with pytest.raises(FileNotFoundError, match=r'no 40-class labels \(new_nyu_class40_NNNN'):
    build(tmp_path / 'raw13', tmp_path / 'data', config='class40')


def test_no_manual_dir_lists_expected(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'manual_dir=.*missing or empty; expected there: '
                     r'train, train_annot, test, test_annot'):
    build(tmp_path / 'does_not_exist', tmp_path / 'data')
