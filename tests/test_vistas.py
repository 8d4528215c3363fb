"""Mapillary Vistas builder: config.json-driven label table, palette PNG labels."""
import json
import os
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

import semseg_jax.data as data_lib
from semseg_jax.data.builders import base
from semseg_jax.data.builders import mapillary_vistas as vistas

KEYS = {'training': ('a' * 22, 'b' * 22, 'c' * 22), 'validation': ('d' * 22, 'e' * 22)}


def config_labels():
  return [{'name': name, 'readable': name.split('--')[-1].title(), 'color': list(colour),
           'instances': False, 'evaluate': evaluate}
          for name, colour, evaluate in vistas.LABELS]


def make_tree(root, layout='labels', config_name='config.json', labels=None):
  """Writes config, JPEGs and palette-mode label PNGs; returns {file_name: raw label ids}."""
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, config_name), 'w') as f:
    json.dump({'labels': labels or config_labels(), 'version': 1.2, 'mapping': 'public'}, f)
  palette = np.array([c for _, c, _ in vistas.LABELS], np.uint8).ravel().tolist()
  raws = {}
  for split, keys in KEYS.items():
    image_dir = os.path.join(root, split, 'images')
    label_dir = os.path.join(root, split, *(('v1.2',) if layout == 'v1.2' else ()), 'labels')
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(label_dir, exist_ok=True)
    for i, key in enumerate(keys):
      h, w = 18 + i, 26 - i
      rng = np.random.default_rng(hash(key) % 1000)
      Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)).save(
          os.path.join(image_dir, key + '.jpg'))
      raw = rng.integers(0, 66, (h, w)).astype(np.uint8)
      raw[0, 0], raw[0, 1], raw[1, 0] = 65, 0, 64  # Unlabeled, Bird, Ego Vehicle.
      label = Image.fromarray(raw, mode='P')
      label.putpalette(palette)
      label.save(os.path.join(label_dir, key + '.png'))
      raws[f'{split}/{key}.jpg'] = raw
  return raws


def build(manual_dir, data_dir, **kwargs):
  builder = vistas.MapillaryVistas(data_dir=str(data_dir), **kwargs)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


@pytest.mark.parametrize('layout,config_name', [('labels', 'config.json'),
                                                ('v1.2', 'config_v1.2.json')])
def test_build_and_read_back(tmp_path, layout, config_name):
  raws = make_tree(tmp_path / 'raw', layout, config_name)
  builder = build(tmp_path / 'raw', tmp_path / 'data')
  sizes = {}
  for split in ('train', 'validation'):
    source = data_lib.get_source({'name': 'mapillary_vistas'}, split,
                                 data_dir=str(tmp_path / 'data'))
    sizes[split] = len(source)
    for i in range(len(source)):
      record = source[i]
      raw = raws[record['file_name'].decode()]
      label = record['label'][..., 0]
      # Ids 0..64 are evaluated and keep their id; 65 (Unlabeled) is ignored.
      np.testing.assert_array_equal(label, np.where(raw == 65, 255, raw))
      assert label[0, 0] == 255 and label[0, 1] == 0 and label[1, 0] == 64
  assert sizes == {'train': 3, 'validation': 2}
  # Names and colours from the config end up in the prepared metadata.
  reloaded = tfds.builder('mapillary_vistas', data_dir=str(tmp_path / 'data'))
  for info in (builder.info, reloaded.info):
    assert info.metadata['readable_names'][:2] == ['Bird', 'Ground-Animal']
    assert info.metadata['palette'][13] == [128, 64, 128]  # Road.
    assert info.metadata['class_names'] == list(vistas.CLASS_NAMES)
  assert 'tensorflow' not in sys.modules


def test_label_table_follows_evaluate_flags():
  labels = config_labels()
  table = vistas.label_table(labels, 'config.json')
  np.testing.assert_array_equal(table[:65], np.arange(65))
  assert table[65] == 255 and (table[66:] == -1).all()
  # A non-evaluated label in the middle shifts the later class ids down by one.
  labels.insert(3, {'name': 'void--extra', 'evaluate': False})
  table = vistas.label_table(labels, 'config.json')
  assert table[3] == 255 and table[4] == 3 and table[66] == 255 and table[65] == 64


def test_static_info():
  info = data_lib.get_dataset_info('mapillary_vistas')
  assert info.num_classes == 65 and info.class_names[0] == 'animal--bird'
  assert 'void--unlabeled' not in info.class_names
  np.testing.assert_array_equal(info.palette[info.class_names.index('nature--sky')],
                                [70, 130, 180])


def test_wrong_config_version(tmp_path):
  labels = config_labels()
  labels[5]['name'] = 'construction--barrier--temporary'
  make_tree(tmp_path / 'raw', labels=labels)
  with pytest.raises(base.BadInputError, match=r'config\.json: 65 evaluated labels, differing '
                     r'from Mapillary Vistas v1.2 \(65\) at position 5'):
    build(tmp_path / 'raw', tmp_path / 'data')


def test_missing_config_and_folders(tmp_path):
  make_tree(tmp_path / 'raw')
  os.remove(tmp_path / 'raw' / 'config.json')
  with pytest.raises(FileNotFoundError, match=r'config\.json or config_v1\.2\.json'):
    build(tmp_path / 'raw', tmp_path / 'data')
  os.makedirs(tmp_path / 'raw2' / 'training' / 'images')
  with pytest.raises(FileNotFoundError, match=r'missing in manual_dir=.*: validation/images'):
    build(tmp_path / 'raw2', tmp_path / 'data')
  os.makedirs(tmp_path / 'raw2' / 'validation' / 'images')
  with pytest.raises(FileNotFoundError, match=r'training/labels, validation/labels'):
    build(tmp_path / 'raw2', tmp_path / 'data')


def test_bad_label_value_and_rgb_label(tmp_path):
  make_tree(tmp_path / 'raw')
  path = tmp_path / 'raw' / 'validation' / 'labels' / ('e' * 22 + '.png')
  raw = np.zeros((19, 25), np.uint8)
  raw[2, 2] = 66
  label = Image.fromarray(raw, mode='P')
  label.putpalette([7] * 768)  # Without a palette PIL may renumber the indices on save.
  label.save(path)
  with pytest.raises(base.BadInputError, match=r'e{22}\.png: raw label values \[66\] have no '
                     'class'):
    build(tmp_path / 'raw', tmp_path / 'data')
  builder = build(tmp_path / 'raw', tmp_path / 'data2', skip_bad=True)
  assert builder.skipped == {'validation': 1}
  # A colour-rendered label (RGB) is not class ids.
  Image.fromarray(np.zeros((19, 25, 3), np.uint8)).save(path)
  with pytest.raises(base.BadInputError, match=r'e{22}\.png: label image has mode RGB'):
    build(tmp_path / 'raw', tmp_path / 'data3')
