"""The prepare tool: builds a registered dataset and reports where and how big."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from semseg_jax import data as data_lib
from semseg_jax.data import prepare
from semseg_jax.data.builders import base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _camvid(root, bad=False):
  """A 2/1/1 SegNet-layout CamVid; with ``bad``, one train annotation has value 12."""
  for split, n in (('train', 2), ('val', 1), ('test', 1)):
    (root / split).mkdir(parents=True)
    (root / f'{split}annot').mkdir()
    for i in range(n):
      Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(root / split / f'{split}{i}.png')
      lab = np.full((4, 5), 3, np.uint8)
      lab[0, 0] = 12 if (bad and split == 'train' and i == 1) else 11
      Image.fromarray(lab).save(root / f'{split}annot' / f'{split}{i}.png')


def test_prepare_function(tmp_path):
  _camvid(tmp_path / 'raw', bad=True)
  with pytest.raises(base.BadInputError, match=r'train1\.png: raw label values \[12\]'):
    prepare.prepare('camvid', manual_dir=str(tmp_path / 'raw'), data_dir=str(tmp_path / 'd'))
  builder = prepare.prepare('camvid', manual_dir=str(tmp_path / 'raw'),
                            data_dir=str(tmp_path / 'd'), skip_bad=True)
  text = prepare.summary('camvid', builder)
  assert f'camvid prepared in {tmp_path}/d/camvid/1.0.0 (array_record)' in text
  assert '  train: 1 examples' in text and '  validation: 1 examples' in text
  assert 'skipped bad examples (--skip_bad): train 1' in text
  assert f'--config.dataset.data_dir={tmp_path}/d' in text
  with pytest.raises(data_lib.DatasetNotFoundError, match='built in'):
    prepare.prepare('shapes')
  with pytest.raises(data_lib.DatasetNotFoundError, match="unknown dataset 'nope'"):
    prepare.prepare('nope')


def _run(*args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'semseg_jax.data.prepare', *args], env=env,
                        capture_output=True, text=True, timeout=120, check=False)


def test_command_line(tmp_path):
  _camvid(tmp_path / 'raw')
  out = _run('--dataset=camvid', f'--manual_dir={tmp_path}/raw', f'--data_dir={tmp_path}/d')
  assert out.returncode == 0, out.stderr
  assert f'camvid prepared in {tmp_path}/d/camvid/1.0.0 (array_record)' in out.stdout
  assert '  train: 2 examples' in out.stdout and '  test: 1 examples' in out.stdout
  # A missing input: one line naming what was expected, no traceback.
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'x').write_text('x')
  out = _run('--dataset=camvid', f'--manual_dir={tmp_path}/empty', f'--data_dir={tmp_path}/e')
  assert out.returncode == 1
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('error: missing in manual_dir=') and 'trainannot' in last
  assert 'Traceback' not in out.stderr
