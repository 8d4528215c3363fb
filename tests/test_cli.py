"""`python -m semseg_jax.main` end to end: train, eval, predict, and its one-line errors."""
import json
import os
import platform
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config.model.feature_scale=32', '--config.dataset.shapes_image_size=(32, 32)',
        '--config.dataset.image_size=(32, 32)', '--config.dataset.num_train=16',
        '--config.dataset.num_eval=6', '--config.batch_size=4', '--config.eval_batch_size=4',
        '--config.num_train_steps=4', '--config.log_every_steps=2',
        '--config.eval_every_steps=4', '--config.checkpoint_every_steps=4']


def run_main(*args, timeout=600):
  return subprocess.run([sys.executable, '-m', 'semseg_jax.main', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def last_line(text):
  return text.strip().splitlines()[-1]


def test_unknown_config_key_is_a_clear_error(tmp_path):
  out = run_main('--config=configs/quickstart.py', f'--workdir={tmp_path}', '--config.nope=1')
  assert out.returncode != 0
  assert 'nope' in out.stderr


def test_missing_dataset_stops_at_once_with_one_message(tmp_path):
  out = run_main('--config=configs/fcn8s.py', f'--workdir={tmp_path / "run"}',
                 f'--config.dataset.data_dir={tmp_path / "tfds"}')
  assert out.returncode == 1
  line = last_line(out.stderr)
  assert line.startswith('error: ') and 'voc2012' in line and 'shapes' in line
  assert 'Traceback' not in out.stderr
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_train_then_eval_then_predict(tmp_path):
  workdir = tmp_path / 'run'
  out = run_main('--config=configs/quickstart.py', f'--workdir={workdir}', *TINY)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'Mean IoU' in out.stdout and 'background' in out.stdout
  # The CLI tunes glibc's malloc before JAX starts (tests/test_cpu_malloc.py).
  glibc = sys.platform.startswith('linux') and platform.libc_ver()[0] == 'glibc'
  assert f'glibc malloc tuned for XLA:CPU: {glibc}' in out.stderr
  assert (workdir / 'metrics.jsonl').exists() and (workdir / 'final_eval.json').exists()

  # eval: config from the workdir, the table with class names, JSON + Markdown reports.
  out = run_main(f'--workdir={workdir}', '--mode=eval')
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'background' in out.stdout
  report = json.loads((workdir / 'eval_step_4.json').read_text())
  assert len(report['per_class_iou']) == 6 and 0 <= report['pixel_acc'] <= 1
  assert (workdir / 'eval_step_4.md').exists()

  # predict: any image size, palette PNGs holding class ids, overlays and panels.
  inputs = tmp_path / 'inputs'
  inputs.mkdir()
  rng = np.random.default_rng(0)
  for i, (h, w) in enumerate([(37, 53), (32, 32)]):
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(inputs / f'im{i}.jpg')
  out = run_main(f'--workdir={workdir}', '--mode=predict', f'--input={inputs}/*.jpg',
                 f'--output={tmp_path / "out"}')
  assert out.returncode == 0, out.stderr[-3000:]
  pred = Image.open(tmp_path / 'out' / 'im0.png')
  assert pred.mode == 'P' and pred.size == (53, 37)
  assert np.asarray(pred).max() < 6
  assert (tmp_path / 'out' / 'im0_overlay.png').exists()
  assert Image.open(tmp_path / 'out' / 'im1_panel.png').size[0] > 64

  out = run_main(f'--workdir={workdir}', '--mode=predict', f'--input={tmp_path}/none*.jpg')
  assert out.returncode == 1 and 'matches no file' in last_line(out.stderr)


def test_export_stablehlo_and_onnx_then_reload(tmp_path):
  from semseg_jax import export  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  out = run_main('--config=configs/quickstart.py', f'--workdir={workdir}', *TINY,
                 '--config.num_train_steps=2', '--config.eval_every_steps=2',
                 '--config.checkpoint_every_steps=2')
  assert out.returncode == 0, out.stderr[-3000:]

  # Default: StableHLO, any batch, the config's 32x32, checked against the model on reload.
  out = run_main(f'--workdir={workdir}', '--mode=export')
  assert out.returncode == 0, out.stderr[-3000:]
  artifact = workdir / 'export' / 'stablehlo' / 'model.stablehlo'
  assert f'to {artifact}' in out.stdout and 'max |diff| 0.00e+00' in out.stdout
  meta = json.loads((artifact.parent / 'model.stablehlo.json').read_text())
  assert meta['input']['shape'] == [None, 32, 32, 3] and meta['checkpoint']['step'] == 2
  assert meta['class_names'][0] == 'background' and len(meta['class_names']) == 6
  assert meta['normalisation']['channel_order'] == 'RGB' and meta['max_abs_diff'] == 0
  logits = np.asarray(export.load_stablehlo(str(artifact))(np.zeros((3, 32, 32, 3), np.float32)))
  assert logits.shape == (3, 32, 32, 6) and np.isfinite(logits).all()

  # ONNX, fixed batch 2, uint8 image -> labels, into --export_dir.
  onnx_dir = tmp_path / 'onnx'
  out = run_main(f'--workdir={workdir}', '--mode=export', '--export_format=onnx',
                 '--export_batch=2', '--export_output=labels', '--export_size=64,32',
                 f'--export_dir={onnx_dir}')
  assert out.returncode == 0, out.stderr[-3000:]
  meta = json.loads((onnx_dir / 'model.onnx.json').read_text())
  assert meta['input'] == {'name': 'image', 'shape': [2, 64, 32, 3], 'dtype': 'uint8',
                           'layout': 'NHWC', 'spatial_multiple': None, 'normalised': False}
  assert meta['max_abs_diff'] == 0  # Fraction of labels that differ from the jitted model.
  labels = export.load_onnx(str(onnx_dir / 'model.onnx'))(np.zeros((2, 64, 32, 3), np.uint8))
  assert labels.shape == (2, 64, 32) and labels.dtype == np.uint8 and labels.max() < 6

  # Polymorphic spatial size: U-Net crops need concrete sizes, so a fixed-size fallback + note.
  out = run_main(f'--workdir={workdir}', '--mode=export', '--export_size=polymorphic',
                 f'--export_dir={tmp_path / "poly"}')
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'note: ' in out.stdout and 'fixed size 32x32' in out.stdout

  out = run_main(f'--workdir={workdir}', '--mode=export', '--export_size=32')
  assert out.returncode == 1 and "--export_size='32'" in last_line(out.stderr), out.stderr[-2000:]
  assert 'Traceback' not in out.stderr
