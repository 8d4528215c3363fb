"""The dataset check tool: counts against numpy, bad-label listing, chart, CLI."""
import numpy as np
from PIL import Image
import pytest

import semseg_jax.data as data_lib
from semseg_jax.data import check
from test_nyuv2 import build as build_nyuv2
from test_nyuv2 import make_tree as make_nyuv2_tree

INFO = data_lib.DatasetInfo('toy', 3, ('a', 'b', 'c'), [[255, 0, 0], [0, 255, 0], [250, 250, 250]])


def _records():
  """Three records of different sizes; the second holds 7 and 200 (no class, not ignore)."""
  rng = np.random.default_rng(0)
  labels = [rng.choice([0, 1, 255], (4, 6)), rng.choice([0, 2, 7, 200, 255], (5, 3)),
            np.full((2, 9), 2)]
  labels[1][0, :2] = (7, 200)
  return [{'image': np.zeros(l.shape + (3,), np.uint8), 'label': l.astype(np.uint8)[..., None],
           'file_name': f'f{i}.png'.encode()} for i, l in enumerate(labels)]


def test_counts_match_numpy():
  records = _records()
  report = check.check_source(records, INFO, 'train')
  every = np.concatenate([r['label'].ravel() for r in records])
  np.testing.assert_array_equal(report.pixels, [(every == k).sum() for k in range(3)])
  np.testing.assert_array_equal(
      report.images_with, [sum((r['label'] == k).any() for r in records) for k in range(3)])
  assert report.ignore_pixels == (every == 255).sum()
  assert report.num_images == 3
  assert report.min_size == (2, 3) and report.max_size == (5, 9)
  np.testing.assert_allclose(report.frequencies, report.pixels / report.pixels.sum())
  assert report.bad_files == [('f1.png', [7, 200])]


def test_wide_and_negative_values_are_reported():
  label = np.array([[0, -1, 300], [255, 2, 2]], np.int32)
  report = check.check_source([{'label': label, 'file_name': 'wide'}], INFO, 'train')
  assert report.bad_files == [('wide', [-1, 300])]
  np.testing.assert_array_equal(report.pixels, [1, 0, 2])
  assert report.ignore_pixels == 1


def test_limit_and_report_text():
  report = check.check_source(_records(), INFO, 'validation', limit=1)
  assert report.num_images == 1 and not report.bad_files
  text = check.format_report(report)
  assert "dataset 'toy' split 'validation': 1 images, height 4..4, width 6..6 px" in text
  assert 'no label values outside 0..2 and 255' in text
  text = check.format_report(check.check_source(_records(), INFO, 'train'))
  assert '1 file(s) hold label values that are neither a class (0..2) nor 255:' in text
  assert '  f1.png: [7, 200]' in text


def test_plot_is_a_png_with_class_colours(tmp_path):
  report = check.check_source(_records(), INFO, 'train')
  size = check.plot_frequencies(report, str(tmp_path / 'freq.png'))
  image = np.asarray(Image.open(tmp_path / 'freq.png'))
  assert image.shape == (size[1], size[0], 3)
  colours = {tuple(c) for c in image.reshape(-1, 3)}
  # The most frequent classes' bars are drawn in their palette colours.
  assert (255, 0, 0) in colours and (0, 255, 0) in colours


def test_cli_on_prepared_dataset(tmp_path, capsys):
  make_nyuv2_tree(tmp_path / 'raw')
  build_nyuv2(tmp_path / 'raw', tmp_path / 'data')
  plot = tmp_path / 'nyu.png'
  status = check.main(['--dataset=nyuv2', '--split=train', f'--data_dir={tmp_path / "data"}',
                       f'--plot={plot}'])
  out = capsys.readouterr().out
  assert status == 0
  assert "dataset 'nyuv2' split 'train': 3 images, height 15..22, width 22..36 px" in out
  assert 'window' in out and plot.exists()


def test_cli_exit_codes(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(check.data_lib, 'get_source', lambda *a, **k: _records())
  monkeypatch.setattr(check.data_lib, 'get_dataset_info', lambda *a, **k: INFO)
  assert check.main(['--dataset=toy', '--split=train']) == 1
  assert 'f1.png: [7, 200]' in capsys.readouterr().out
  monkeypatch.undo()
  assert check.main(['--dataset=nyuv2', '--split=train', f'--data_dir={tmp_path}']) == 2
  assert "'nyuv2' is not prepared" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    check.main(['--dataset=nyuv2', '--split=train', '--plot=out.jpg'])
