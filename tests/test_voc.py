"""voc2012 builder on a tiny fixture tree in the real VOC / SBD layouts (no network)."""
import sys
import tarfile

import numpy as np
from PIL import Image
import pytest
from scipy import io as sio
import tensorflow_datasets as tfds

from semseg_jax import data as data_lib
from semseg_jax.data import pipeline
from semseg_jax.data.builders import base
from semseg_jax.data.builders import voc

H, W = 10, 12
VOC_TRAIN = ['2007_000001', '2007_000002', '2007_000003']
VOC_VAL = ['2007_000004', '2007_000005']
SBD_TRAIN = ['2007_000002', '2008_000010', '2007_000004']  # One in VOC train, one in VOC val.
SBD_VAL = ['2008_000011', '2008_000010']  # Duplicate id across SBD lists.
TRAIN_AUG = ['2007_000001', '2007_000002', '2007_000003', '2008_000010', '2008_000011']


def _voc_label(k):
  """Class ids k % 21 with a 255 void border, as the VOC PNGs have."""
  lab = np.full((H, W), k % 21, np.uint8)
  lab[:, :3] = (k + 1) % 21
  lab[0, :] = 255
  return lab


def _sbd_label(k):
  lab = np.full((H, W), (k * 3) % 21, np.uint8)  # No border in SBD.
  lab[5:, :] = 15
  return lab


def _num(i):
  return int(i.split('_')[1])


def _save_palette_png(path, lab):
  img = Image.fromarray(lab, mode='P')
  img.putpalette(base.voc_colormap().reshape(-1).tolist())
  img.save(path)


def _write_voc(root):
  voc_dir = root / 'VOCdevkit' / 'VOC2012'
  for sub in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'):
    (voc_dir / sub).mkdir(parents=True)
  rng = np.random.default_rng(0)
  for i in VOC_TRAIN + VOC_VAL + ['2008_000010']:  # 2008_000011 only in SBD's img/.
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
        voc_dir / 'JPEGImages' / f'{i}.jpg')
  for i in VOC_TRAIN + VOC_VAL:
    _save_palette_png(voc_dir / 'SegmentationClass' / f'{i}.png', _voc_label(_num(i)))
  (voc_dir / 'ImageSets/Segmentation/train.txt').write_text('\n'.join(VOC_TRAIN) + '\n')
  (voc_dir / 'ImageSets/Segmentation/val.txt').write_text('\n'.join(VOC_VAL) + '\n')
  return voc_dir


def _write_sbd(root):
  sbd = root / 'benchmark_RELEASE' / 'dataset'
  (sbd / 'cls').mkdir(parents=True)
  (sbd / 'img').mkdir()
  for i in set(SBD_TRAIN + SBD_VAL):
    sio.savemat(sbd / 'cls' / f'{i}.mat',
                {'GTcls': {'Segmentation': _sbd_label(_num(i)),
                           'Boundaries': np.zeros((21, 1), object),
                           'CategoriesPresent': np.array([1], np.uint8)}})
    Image.fromarray(np.full((H, W, 3), 100, np.uint8)).save(sbd / 'img' / f'{i}.jpg')
  (sbd / 'train.txt').write_text('\n'.join(SBD_TRAIN) + '\n')
  (sbd / 'val.txt').write_text('\n'.join(SBD_VAL) + '\n')
  return sbd


def _build(tmp_path, manual, **kw):
  builder = voc.Voc2012(data_dir=str(tmp_path / 'data'), **kw)
  builder.download_and_prepare(
      download_dir=str(tmp_path / 'dl'),
      download_config=tfds.download.DownloadConfig(
          manual_dir=str(manual) if manual else None))
  return builder


def _records(tmp_path, split):
  cfg = pipeline.default_dataset_config()
  cfg.name = 'voc2012'
  src = data_lib.get_source(cfg, split, data_dir=str(tmp_path / 'data'))
  return src, {src[i]['file_name'].decode(): src[i] for i in range(len(src))}


def test_info_registered_without_data_or_tensorflow():
  info = data_lib.get_dataset_info('voc2012')
  assert info.num_classes == 21 and info.class_names[15] == 'person'
  np.testing.assert_array_equal(info.palette[[1, 15]], [[128, 0, 0], [192, 128, 128]])
  assert 'tensorflow' not in sys.modules


def test_build_from_folders(tmp_path):
  raw = tmp_path / 'raw'
  _write_voc(raw)
  _write_sbd(raw)
  builder = _build(tmp_path, raw)
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      'train': 3, 'validation': 2, 'train_aug': 5}
  assert builder.info.metadata['class_names'][0] == 'background'

  _, train = _records(tmp_path, 'train')
  assert sorted(train) == VOC_TRAIN
  for i in VOC_TRAIN:
    np.testing.assert_array_equal(train[i]['label'][..., 0], _voc_label(_num(i)))
    assert train[i]['image'].shape == (H, W, 3) and train[i]['image'].dtype == np.uint8
  assert (train['2007_000001']['label'][0] == 255).all()  # Void border stays ignore.

  _, val = _records(tmp_path, 'validation')
  assert sorted(val) == VOC_VAL

  _, aug = _records(tmp_path, 'train_aug')
  assert sorted(aug) == TRAIN_AUG  # VOC val 2007_000004 excluded, duplicates merged.
  # VOC label wins over SBD's for an id in both.
  np.testing.assert_array_equal(aug['2007_000002']['label'][..., 0], _voc_label(2))
  for i in ('2008_000010', '2008_000011'):
    np.testing.assert_array_equal(aug[i]['label'][..., 0], _sbd_label(_num(i)))
  # 2008_000011 has no VOC JPEG: SBD's image is used.
  assert np.abs(aug['2008_000011']['image'].astype(int) - 100).max() <= 2


def test_eval_iterator_reads_built_split(tmp_path):
  raw = tmp_path / 'raw'
  _write_voc(raw)
  _build(tmp_path, raw, sbd=False)
  cfg = pipeline.default_dataset_config()
  cfg.name = 'voc2012'
  cfg.image_size = (16, 16)
  cfg.eval_pad_size = (16, 16)
  src = data_lib.get_source(cfg, 'validation', data_dir=str(tmp_path / 'data'))
  batches = list(pipeline.make_eval_iterator(src, cfg, batch_size=2))
  assert len(batches) == 1
  label = batches[0]['label']
  assert label.shape == (2, 16, 16) and batches[0]['image'].shape == (2, 16, 16, 3)
  expected = {tuple(np.unique(_voc_label(_num(i)))) for i in VOC_VAL}
  got = {tuple(np.unique(label[b, :H, :W])) for b in range(2)}
  assert got == expected
  assert (label[:, H:, :] == 255).all()  # Padding is ignore.


def test_sbd_false_builds_voc_only(tmp_path):
  raw = tmp_path / 'raw'
  _write_voc(raw)
  builder = _build(tmp_path, raw, sbd=False)
  assert sorted(builder.info.splits.keys()) == ['train', 'validation']


def _tar(path, src_dir, arcname, mode):
  with tarfile.open(path, mode) as tar:
    tar.add(src_dir, arcname=arcname)


def test_download_and_manual_archives(tmp_path, monkeypatch):
  src = tmp_path / 'src'
  _write_voc(src)
  _write_sbd(src)
  archives = tmp_path / 'archives'
  archives.mkdir()
  _tar(archives / voc.VOC_ARCHIVE, src / 'VOCdevkit', 'VOCdevkit', 'w')
  _tar(archives / voc.SBD_ARCHIVE, src / 'benchmark_RELEASE', 'benchmark_RELEASE', 'w:gz')
  urls = {voc.VOC_URL: archives / voc.VOC_ARCHIVE, voc.SBD_URL: archives / voc.SBD_ARCHIVE}
  fetched = []

  def fake_download(self, url):
    del self
    fetched.append(url)
    return urls[url]

  monkeypatch.setattr(tfds.download.DownloadManager, 'download', fake_download)
  builder = _build(tmp_path, None)  # No manual_dir: both archives are "downloaded".
  assert sorted(fetched) == sorted(urls)
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      'train': 3, 'validation': 2, 'train_aug': 5}

  # Archives placed in manual_dir are used without downloading.
  fetched.clear()
  builder = voc.Voc2012(data_dir=str(tmp_path / 'data2'))
  builder.download_and_prepare(
      download_dir=str(tmp_path / 'dl2'),
      download_config=tfds.download.DownloadConfig(manual_dir=str(archives)))
  assert not fetched
  assert builder.info.splits['train_aug'].num_examples == 5


def test_missing_manual_files_listed(tmp_path):
  raw = tmp_path / 'raw'
  voc_dir = _write_voc(raw)
  (voc_dir / 'ImageSets/Segmentation/val.txt').unlink()
  for f in (voc_dir / 'SegmentationClass').iterdir():
    f.unlink()
  (voc_dir / 'SegmentationClass').rmdir()
  with pytest.raises(FileNotFoundError) as e:
    _build(tmp_path, raw, sbd=False)
  msg = str(e.value)
  assert str(voc_dir) in msg and 'SegmentationClass' in msg and 'val.txt' in msg
  assert 'JPEGImages' not in msg


def test_bad_sbd_label_stops_or_is_skipped(tmp_path):
  raw = tmp_path / 'raw'
  _write_voc(raw)
  sbd = _write_sbd(raw)
  (sbd / 'cls' / '2008_000011.mat').write_bytes(b'garbage')
  with pytest.raises(base.BadInputError, match=r'2008_000011\.mat: unreadable SBD label'):
    _build(tmp_path, raw)
  builder = _build(tmp_path, raw, skip_bad=True)
  assert builder.skipped == {'train_aug': 1}
  assert builder.info.splits['train_aug'].num_examples == 4


def test_out_of_range_voc_label(tmp_path):
  raw = tmp_path / 'raw'
  voc_dir = _write_voc(raw)
  lab = _voc_label(3)
  lab[4, 4] = 21
  _save_palette_png(voc_dir / 'SegmentationClass' / '2007_000003.png', lab)
  with pytest.raises(base.BadInputError,
                     match=r'2007_000003\.png: label values \[21\] are not class ids 0\.\.20'):
    _build(tmp_path, raw, sbd=False)


def test_real_download_manager_over_local_http(tmp_path, monkeypatch):
  """The unpatched TFDS download path (requests, no TensorFlow) from a local HTTP server."""
  import functools  # pylint: disable=g-import-not-at-top
  import http.server  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top

  src = tmp_path / 'src'
  _write_voc(src)
  served = tmp_path / 'served'
  served.mkdir()
  _tar(served / voc.VOC_ARCHIVE, src / 'VOCdevkit', 'VOCdevkit', 'w')
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
  handler.log_message = lambda *a: None
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    monkeypatch.setattr(voc, 'VOC_URL',
                        f'http://127.0.0.1:{server.server_port}/{voc.VOC_ARCHIVE}')
    builder = _build(tmp_path, None, sbd=False)
  finally:
    server.shutdown()
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      'train': 3, 'validation': 2}
  # A fresh reader sees the metadata saved with the data.
  fresh = tfds.builder('voc2012', data_dir=str(tmp_path / 'data'))
  assert fresh.info.metadata['class_names'] == list(voc.CLASS_NAMES)
  assert fresh.info.metadata['palette'][15] == [192, 128, 128]
  assert 'tensorflow' not in sys.modules
