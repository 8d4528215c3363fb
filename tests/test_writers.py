"""Tests for semseg_jax.writers: read back with TensorBoard's own loader."""
import io
import json
import os
import sys

import numpy as np
import pytest

from semseg_jax import writers


def _tb_accumulator(logdir):
  """TensorBoard's own reader over ``logdir``, loaded.

  TensorBoard imports TensorFlow when it can (the [test] extra installs it for
  the SavedModel export test) and else uses its built-in stub; TensorFlow is
  blocked here so that this process keeps proving that we never import it.
  """
  pytest.importorskip('tensorboard')
  blocked = 'tensorflow' not in sys.modules
  if blocked:
    sys.modules['tensorflow'] = None  # `import tensorflow` -> ImportError -> stub.
  try:
    from tensorboard.backend.event_processing import event_accumulator as ea
    acc = ea.EventAccumulator(
        str(logdir), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0, ea.TENSORS: 0})
    acc.Reload()
  finally:
    if blocked:
      del sys.modules['tensorflow']
  return acc


def test_crc32c_known_vectors():
  assert writers.crc32c(b'123456789') == 0xE3069283
  assert writers.crc32c(b'') == 0
  assert writers.crc32c(b'\x00' * 32) == 0x8A9136AA  # RFC 3720 B.4


@pytest.mark.parametrize('size', [1 << 15, (1 << 15) + 1023, 100_003])
def test_crc32c_vectorised_path_matches_byte_loop(size):
  data = np.random.default_rng(size).integers(0, 256, size,
                                              np.uint8).tobytes()
  assert size >= writers._VECTOR_MIN_BYTES
  want = writers._update_py(0xFFFFFFFF, data) ^ 0xFFFFFFFF
  assert writers.crc32c(data) == want


def test_masked_crc_matches_tensorboard_implementation():
  pytest.importorskip('tensorboard')
  from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as stub
  for data in (b'abc', bytes(range(256)) * 200):
    assert writers.masked_crc32c(data) == stub.masked_crc32c(data)


def test_tfrecord_frame_layout():
  rec = writers.tfrecord_frame(b'hello')
  assert len(rec) == 8 + 4 + 5 + 4
  assert int.from_bytes(rec[:8], 'little') == 5
  assert rec[12:17] == b'hello'
  assert int.from_bytes(rec[-4:], 'little') == writers.masked_crc32c(b'hello')


def test_tensorboard_writer_scalars_images_texts(tmp_path):
  from PIL import Image
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (5, 7, 3), np.uint8)
  batch = rng.integers(0, 256, (2, 4, 6, 1), np.uint8)
  with writers.TensorBoardWriter(tmp_path) as w:
    w.write_scalars(3, {'loss': 0.5, 'acc': np.float32(0.25)})
    w.write_scalars(10, {'loss': np.array(0.125), 'lr': 1e-3})
    w.write_images(10, {'pred': image, 'gray': batch})
    w.write_hparams({'model': 'fcn8s', 'optim': {'lr': 0.01}})
  files = os.listdir(tmp_path)
  assert len(files) == 1 and files[0].startswith('events.out.tfevents.')
  assert 'tensorflow' not in sys.modules  # Written without TensorFlow.

  acc = _tb_accumulator(tmp_path)
  tags = acc.Tags()
  assert sorted(tags['scalars']) == ['acc', 'loss', 'lr']
  assert [(e.step, e.value) for e in acc.Scalars('loss')] == [(3, 0.5),
                                                             (10, 0.125)]
  assert acc.Scalars('acc')[0].value == 0.25
  assert acc.Scalars('lr')[0].value == pytest.approx(1e-3, rel=1e-7)
  assert sorted(tags['images']) == ['gray/0', 'gray/1', 'pred']
  (event,) = acc.Images('pred')
  assert (event.step, event.height, event.width) == (10, 5, 7)
  decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))
  np.testing.assert_array_equal(decoded, image)
  decoded = np.asarray(Image.open(io.BytesIO(
      acc.Images('gray/1')[0].encoded_image_string)))
  np.testing.assert_array_equal(decoded, batch[1, ..., 0])
  (text,) = acc.Tensors('hparams')
  table = text.tensor_proto.string_val[0].decode()
  assert "| model | 'fcn8s' |" in table and '| optim.lr | 0.01 |' in table


def test_large_image_record_passes_tensorboard_crc_check(tmp_path):
  # A noise PNG is > 32 KiB, so its crc goes through the vectorised path;
  # TensorBoard's reader drops records whose crc does not match.
  noise = np.random.default_rng(1).integers(0, 256, (128, 128, 3), np.uint8)
  with writers.TensorBoardWriter(tmp_path) as w:
    w.write_images(1, {'noise': noise})
  acc = _tb_accumulator(tmp_path)
  (event,) = acc.Images('noise')
  assert len(event.encoded_image_string) > writers._VECTOR_MIN_BYTES


def test_tensorboard_writer_new_file_per_instance(tmp_path):
  for step in (1, 2):
    with writers.TensorBoardWriter(tmp_path) as w:
      w.write_scalars(step, {'x': float(step)})
  assert len(os.listdir(tmp_path)) == 2
  acc = _tb_accumulator(tmp_path)
  assert sorted((e.step, e.value) for e in acc.Scalars('x')) == [(1, 1.0),
                                                                 (2, 2.0)]


def test_tensorboard_writer_bad_input(tmp_path):
  w = writers.TensorBoardWriter(tmp_path)
  with pytest.raises(ValueError, match="image 'img' must be uint8"):
    w.write_images(0, {'img': np.zeros((4, 4, 3), np.float32)})
  with pytest.raises(ValueError, match="image 'img': expected 1, 3 or 4"):
    w.write_images(0, {'img': np.zeros((4, 4, 2), np.uint8)})
  with pytest.raises(ValueError, match="scalar 'vec' must be a single"):
    w.write_scalars(0, {'vec': np.zeros(3)})
  w.close()
  with pytest.raises(ValueError, match='closed'):
    w.write_scalars(0, {'x': 1.0})


def test_jsonl_writer_appends_and_writes_null_for_nan(tmp_path):
  path = tmp_path / 'sub' / 'metrics.jsonl'
  with writers.JsonlWriter(path) as w:
    w.write_scalars(1, {'loss': np.float32(0.5), 'miou': float('nan'),
                        'n': np.int32(3)})
    w.write_images(1, {'img': np.zeros((2, 2, 3), np.uint8)})  # ignored
  with writers.JsonlWriter(path) as w:  # a resumed run
    w.write_scalars(2, {'loss': float('inf')})
  lines = path.read_text().splitlines()
  assert [json.loads(line) for line in lines] == [
      {'step': 1, 'loss': 0.5, 'miou': None, 'n': 3},
      {'step': 2, 'loss': None}]
  assert 'NaN' not in lines[0]
  with writers.JsonlWriter(path) as w:
    with pytest.raises(ValueError, match="'step' is reserved"):
      w.write_scalars(3, {'step': 1})
    with pytest.raises(ValueError, match="scalar 'img'"):
      w.write_scalars(3, {'img': np.zeros((2, 2))})


def test_multi_writer_and_default_writer(tmp_path):
  w = writers.create_default_writer(tmp_path)  # process 0 in a test
  w.write_scalars(5, {'loss': 1.5})
  w.write_images(5, {'img': np.zeros((3, 3, 3), np.uint8)})
  w.flush()
  w.close()
  files = sorted(os.listdir(tmp_path))
  assert len(files) == 2 and files[1] == 'metrics.jsonl'
  assert files[0].startswith('events.out.tfevents.')
  assert json.loads((tmp_path / 'metrics.jsonl').read_text()) == {
      'step': 5, 'loss': 1.5}
  acc = _tb_accumulator(tmp_path)
  assert acc.Scalars('loss')[0].value == 1.5

  other = tmp_path / 'other'
  w = writers.create_default_writer(other, just_logging=True)
  assert isinstance(w, writers.LoggingWriter)
  w.write_scalars(1, {'loss': 1.0})
  w.close()
  assert not other.exists()
