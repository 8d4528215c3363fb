"""cityscapes builder on tiny fixture trees: extracted folders and the official zips."""
import sys
import zipfile

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from semseg_jax import data as data_lib
from semseg_jax.data import pipeline
from semseg_jax.data.builders import base
from semseg_jax.data.builders import cityscapes

H, W = 8, 16
FILES = {'train': ['aachen_000000_000019', 'aachen_000001_000019', 'bochum_000000_000313'],
         'val': ['frankfurt_000000_000294', 'lindau_000000_000019'],
         'test': ['berlin_000000_000019']}

# cityscapesScripts labels.py (id, trainId), written out independently of the
# builder's table: the 19 evaluated classes; every other id 0..33 -> 255.
OFFICIAL = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
            24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def _label_ids(k):
  """labelIds covering all 34 ids (rows) shifted by k."""
  return ((np.arange(H * W).reshape(H, W) + k) % 34).astype(np.uint8)


def _train_ids(label_ids):
  return np.vectorize(lambda v: OFFICIAL.get(int(v), 255))(label_ids).astype(np.uint8)


def _files(corrupt=None):
  """relpath -> bytes of the official layout (PNG images, labelIds PNGs, extras)."""
  import io  # pylint: disable=g-import-not-at-top
  out = {}
  k = 0
  for split, stems in FILES.items():
    for stem in stems:
      city = stem.split('_')[0]
      buf = io.BytesIO()
      Image.fromarray(np.full((H, W, 3), k * 10, np.uint8)).save(buf, format='PNG')
      out[f'leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png'] = buf.getvalue()
      lab = _label_ids(k) if split != 'test' else np.zeros((H, W), np.uint8)
      buf = io.BytesIO()
      Image.fromarray(lab).save(buf, format='PNG')
      out[f'gtFine/{split}/{city}/{stem}_gtFine_labelIds.png'] = buf.getvalue()
      # Other gtFine files the real archive has: must be ignored.
      out[f'gtFine/{split}/{city}/{stem}_gtFine_color.png'] = buf.getvalue()
      out[f'gtFine/{split}/{city}/{stem}_gtFine_polygons.json'] = b'{}'
      k += 1
  return out


def _write_folders(root, files):
  for rel, content in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def _write_zips(root, files):
  root.mkdir(parents=True)
  for top, archive in (('leftImg8bit', cityscapes.IMAGES_ZIP),
                       ('gtFine', cityscapes.LABELS_ZIP)):
    with zipfile.ZipFile(root / archive, 'w') as z:
      z.writestr('README', 'x')
      z.writestr('license.txt', 'x')
      for rel, content in files.items():
        if rel.startswith(top + '/'):
          z.writestr(rel, content)


def _build(tmp_path, raw, **kw):
  builder = cityscapes.Cityscapes(data_dir=str(tmp_path / 'data'), **kw)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(raw)))
  return builder


def test_table_matches_official_definition():
  expected = np.array([OFFICIAL.get(i, 255) for i in range(34)])
  np.testing.assert_array_equal(cityscapes.LABEL_ID_TO_TRAIN_ID, expected)
  info = data_lib.get_dataset_info('cityscapes')
  assert info.num_classes == 19 and info.class_names[0] == 'road'
  assert info.class_names[18] == 'bicycle'
  assert 'tensorflow' not in sys.modules


@pytest.mark.parametrize('layout', ['folders', 'zips'])
def test_build_and_read(tmp_path, layout):
  raw = tmp_path / 'raw'
  (_write_folders if layout == 'folders' else _write_zips)(raw, _files())
  builder = _build(tmp_path, raw)
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      'train': 3, 'validation': 2, 'test': 1}
  cfg = pipeline.default_dataset_config()
  cfg.name = 'cityscapes'
  k = 0
  for split in ('train', 'validation', 'test'):
    src = data_lib.get_source(cfg, split, data_dir=str(tmp_path / 'data'))
    recs = {src[i]['file_name'].decode(): src[i] for i in range(len(src))}
    folder = {'validation': 'val'}.get(split, split)
    assert sorted(recs) == FILES[folder]
    for stem in FILES[folder]:
      rec = recs[stem]
      assert rec['image'].shape == (H, W, 3)
      assert (rec['image'] == k * 10).all()
      label = rec['label'][..., 0]
      if split == 'test':
        assert (label == 255).all()
      else:
        np.testing.assert_array_equal(label, _train_ids(_label_ids(k)))
        assert set(np.unique(label)) == set(range(19)) | {255}
      k += 1


def test_missing_inputs_listed(tmp_path):
  raw = tmp_path / 'raw'
  raw.mkdir()
  (raw / 'unrelated.txt').write_text('x')
  with pytest.raises(FileNotFoundError,
                     match=r'leftImg8bit/ \(or leftImg8bit_trainvaltest\.zip\), gtFine/ \(or '
                           r'gtFine_trainvaltest\.zip\)'):
    _build(tmp_path, raw)
  files = {k: v for k, v in _files().items() if not k.startswith('gtFine/val/')}
  _write_folders(tmp_path / 'raw2', files)
  with pytest.raises(FileNotFoundError, match=r'gtFine/val/') as e:
    _build(tmp_path, tmp_path / 'raw2')
  assert 'leftImg8bit/val' not in str(e.value)


def test_bad_label_values_and_missing_label(tmp_path):
  import io  # pylint: disable=g-import-not-at-top
  files = _files()
  buf = io.BytesIO()
  Image.fromarray(np.full((H, W), 40, np.uint8)).save(buf, format='PNG')
  bad = 'gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png'
  files[bad] = buf.getvalue()
  del files['gtFine/train/bochum/bochum_000000_000313_gtFine_labelIds.png']
  _write_zips(tmp_path / 'raw', files)
  with pytest.raises(base.BadInputError,
                     match=r'bochum_000000_000313_gtFine_labelIds\.png: missing label file'):
    _build(tmp_path, tmp_path / 'raw')
  builder = _build(tmp_path, tmp_path / 'raw', skip_bad=True)
  assert builder.skipped == {'train': 1, 'validation': 1}
  assert builder.info.splits['validation'].num_examples == 1


def test_raw_label_out_of_range_names_file(tmp_path):
  import io  # pylint: disable=g-import-not-at-top
  files = _files()
  buf = io.BytesIO()
  Image.fromarray(np.full((H, W), 40, np.uint8)).save(buf, format='PNG')
  files['gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png'] = buf.getvalue()
  _write_folders(tmp_path / 'raw', files)
  with pytest.raises(base.BadInputError,
                     match=r'lindau_000000_000019_gtFine_labelIds\.png: raw label values \[40\] '
                           r'out of range 0\.\.33'):
    _build(tmp_path, tmp_path / 'raw')
