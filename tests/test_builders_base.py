"""Tests of the shared builder base: validation, skip_bad, ArrayRecord round trip without TF."""
import io
import os
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from semseg_jax import data as data_lib
from semseg_jax.data.builders import base


class ToySeg(base.SegmentationBuilder):
  """Three classes; examples listed in manual_dir/list.txt as 'image label' lines."""
  VERSION = tfds.core.Version('1.0.0')
  CLASS_NAMES = ('a', 'b', 'c')
  PALETTE = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'Put list.txt and the images in manual_dir.'

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(os.fspath(dl_manager.manual_dir))}

  def _generate_examples(self, root):
    with open(os.path.join(root, 'list.txt')) as f:
      for line in f:
        image, label = line.split()
        ex = self.make_example(os.path.join(root, image), os.path.join(root, label),
                               os.path.splitext(image)[0], split='train')
        if ex:
          yield ex


def _rgb(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_tree(root, labels, fmt='png', h=6, w=7):
  """Writes image i (RGB h x w, lossless PNG unless fmt='jpg') and palette-PNG label i."""
  os.makedirs(root, exist_ok=True)
  lines = []
  for i, lab in enumerate(labels):
    Image.fromarray(_rgb(h, w, i)).save(os.path.join(root, f'img{i}.{fmt}'))
    p = Image.fromarray(lab, mode='P')
    p.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [200] * 759)
    p.save(os.path.join(root, f'lab{i}.png'))
    lines.append(f'img{i}.{fmt} lab{i}.png')
  with open(os.path.join(root, 'list.txt'), 'w') as f:
    f.write('\n'.join(lines))


def _labels(n=3, h=6, w=7):
  out = []
  for i in range(n):
    lab = (np.arange(h * w).reshape(h, w) + i) % 3
    lab[0, :] = 255
    out.append(lab.astype(np.uint8))
  return out


def _build(tmp_path, **kw):
  builder = ToySeg(data_dir=str(tmp_path / 'data'), **kw)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / 'raw')))
  return builder


def test_encode_png_gray_roundtrip_is_mode_l():
  lab = np.array([[0, 1, 255], [20, 3, 4]], np.uint8)
  img = Image.open(io.BytesIO(base.encode_png_gray(lab)))
  assert img.mode == 'L'
  np.testing.assert_array_equal(np.asarray(img), lab)
  with pytest.raises(ValueError, match='uint8'):
    base.encode_png_gray(lab.astype(np.int32))


def test_build_and_read_back_without_tensorflow(tmp_path):
  labels = _labels()
  _write_tree(tmp_path / 'raw', labels)
  builder = _build(tmp_path)
  assert builder.info.file_format.value == 'array_record'
  assert builder.info.metadata['class_names'] == ['a', 'b', 'c']
  assert builder.info.metadata['palette'][1] == [255, 0, 0]
  src = tfds.data_source('toy_seg', split='train', data_dir=str(tmp_path / 'data'))
  assert len(src) == 3
  by_name = {}
  for i in range(len(src)):
    rec = src[i]
    by_name[rec['file_name'].decode() if isinstance(rec['file_name'], bytes)
            else rec['file_name']] = rec
  assert sorted(by_name) == ['img0', 'img1', 'img2']
  for i, lab in enumerate(labels):
    rec = by_name[f'img{i}']
    assert rec['image'].dtype == np.uint8 and rec['image'].shape == (6, 7, 3)
    np.testing.assert_array_equal(rec['image'], _rgb(6, 7, i))  # PNG bytes kept: lossless.
    # Palette indices, not colours; 255 stays ignore.
    np.testing.assert_array_equal(rec['label'][..., 0], lab)
  assert 'tensorflow' not in sys.modules


def test_greyscale_jpeg_image_becomes_rgb(tmp_path):
  _write_tree(tmp_path / 'raw', _labels(1))
  Image.fromarray(_rgb(6, 7)[..., 0]).save(tmp_path / 'raw' / 'img0.png')  # mode L image.
  _build(tmp_path)
  rec = tfds.data_source('toy_seg', split='train', data_dir=str(tmp_path / 'data'))[0]
  assert rec['image'].shape == (6, 7, 3)
  np.testing.assert_array_equal(rec['image'][..., 2], _rgb(6, 7)[..., 0])


@pytest.mark.parametrize('problem', ['truncated', 'size', 'value'])
def test_bad_input_stops_build_naming_file(tmp_path, problem):
  labels = _labels()
  if problem == 'size':
    labels[1] = labels[1][:5]
  if problem == 'value':
    labels[1][2, 2] = 7
  _write_tree(tmp_path / 'raw', labels)
  if problem == 'truncated':
    path = tmp_path / 'raw' / 'img1.png'
    path.write_bytes(path.read_bytes()[:60])
  expected = {'truncated': r'img1\.png: unreadable image',
              'size': r'lab1\.png: label size 7x5 \(WxH\) does not match image .*img1\.png '
                      r'size 7x6',
              'value': r'lab1\.png: label values \[7\] are not class ids 0\.\.2 or 255'}[problem]
  with pytest.raises(base.BadInputError, match=expected) as e:
    _build(tmp_path)
  assert '\n' not in str(e.value)


def test_skip_bad_skips_and_counts(tmp_path):
  labels = _labels(4)
  labels[2][1, 1] = 9
  _write_tree(tmp_path / 'raw', labels)
  builder = _build(tmp_path, skip_bad=True)
  assert builder.skipped == {'train': 1}
  src = tfds.data_source('toy_seg', split='train', data_dir=str(tmp_path / 'data'))
  assert len(src) == 3
  assert sorted(src[i]['file_name'] for i in range(3)) == [b'img0', b'img1', b'img3']


def test_read_label_png_rejects_rgb_labels(tmp_path):
  Image.fromarray(_rgb(4, 4)).save(tmp_path / 'rgb.png')
  with pytest.raises(base.BadInputError, match=r'rgb\.png: label image has mode RGB'):
    base.read_label_png(str(tmp_path / 'rgb.png'))
  (tmp_path / 'junk.png').write_bytes(b'not a png')
  with pytest.raises(base.BadInputError, match=r'junk\.png: unreadable label image'):
    base.read_label_png(str(tmp_path / 'junk.png'))


def test_apply_label_map():
  table = np.array([255, 0, 1, -1])
  np.testing.assert_array_equal(base.apply_label_map(np.array([[0, 1], [2, 2]]), table, 'f'),
                                [[255, 0], [1, 1]])
  with pytest.raises(base.BadInputError, match=r'f: raw label values \[3\] have no class'):
    base.apply_label_map(np.array([[3, 1]]), table, 'f')
  with pytest.raises(base.BadInputError, match=r'f: raw label values \[4, 9\] out of range 0\.\.3'):
    base.apply_label_map(np.array([[4, 9, 0]]), table, 'f')


def test_require_paths_lists_every_missing_path(tmp_path):
  (tmp_path / 'a').mkdir()
  base.require_paths(tmp_path, ['a'])
  with pytest.raises(FileNotFoundError) as e:
    base.require_paths(tmp_path, ['a', 'b/c', 'd.zip'], 'see the README')
  msg = str(e.value)
  assert f'manual_dir={tmp_path}' in msg and 'b/c' in msg and 'd.zip' in msg
  assert 'a,' not in msg and 'see the README' in msg


def test_dataset_info():
  info = base.dataset_info('toy', ToySeg.CLASS_NAMES, ToySeg.PALETTE)
  assert isinstance(info, data_lib.DatasetInfo)
  assert info.num_classes == 3 and info.ignore_index == 255
  assert info.palette.dtype == np.uint8 and info.palette.shape == (3, 3)
