"""Property-based tests: bad input only ever raises the project's documented errors.

* The config loader (``config.load_config``) given random overrides, and random
  config *files*, either returns a config or raises ``config.ConfigError``.
* The dataset readers (``builders.base``: image decoding, label PNGs, label
  tables, the image/label checks of ``make_example``) given random bytes,
  truncated or oddly encoded images, wrong sizes and out-of-range labels either
  return a valid example or raise ``builders.base.BadInputError`` naming the
  file.
* Unknown or unprepared datasets raise ``data.DatasetNotFoundError``.

All three error types are ``ValueError`` subclasses with one-line messages.
"""
from __future__ import annotations

import io
import zlib

from hypothesis import HealthCheck, given, settings, strategies as st
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from semseg_jax import config as config_lib
from semseg_jax import data as data_lib
from semseg_jax.data.builders import base

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def _flat_keys(config, prefix=''):
  keys = []
  for key, value in config.items():
    if hasattr(value, 'items'):
      keys.extend(_flat_keys(value, prefix + key + '.'))
    keys.append(prefix + key)
  return keys


KEYS = sorted(_flat_keys(config_lib.load_config('quickstart')))

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.integers(),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(['sgd', 'adam', 'poly', 'cosine', 'shapes', 'voc2012', 'unet', 'fcn8s',
                     'latest', 'best', 'raise', 'skip', 'slide', 'whole', 'bfloat16']))
VALUES = st.one_of(_scalars, st.lists(_scalars, max_size=4).map(tuple),
                   st.lists(st.integers(-2, 600), min_size=2, max_size=2).map(tuple),
                   st.dictionaries(st.text(max_size=4), _scalars, max_size=2))
OVERRIDE_KEYS = st.one_of(st.sampled_from(KEYS),
                          st.text(alphabet='abcdefgz._', min_size=1, max_size=12))


def _one_line(e: BaseException) -> None:
  assert str(e) and '\n' not in str(e), repr(str(e))


@SETTINGS
@given(st.dictionaries(OVERRIDE_KEYS, VALUES, min_size=1, max_size=3))
def test_random_overrides_load_or_raise_config_error(overrides):
  try:
    config = config_lib.load_config('quickstart', overrides)
  except config_lib.ConfigError as e:
    _one_line(e)
    return
  # Accepted: then the values are usable (re-validating is stable).
  config_lib.validate_config(config)
  assert config.batch_size > 0 and config.optimizer.learning_rate > 0


_FILE_BODIES = st.sampled_from([
    'def get_config(:\n',  # Syntax error.
    'x = 1\n',  # No get_config.
    'def get_config():\n  return 3\n',  # Not a ConfigDict.
    'def get_config():\n  return {"batch_size": 4}\n',  # A dict missing everything.
    'def get_config():\n  raise RuntimeError("boom")\n',
    'import no_such_module_xyz\n',
    'from configs import default\ndef get_config():\n  c = default.get_config()\n'
    '  c.batch_sise = 4\n  return c\n',  # A typo'd key.
    'from configs import default\ndef get_config():\n  c = default.get_config()\n'
    '  c.optimizer.momentum = "high"\n  return c\n',
    'from configs import default\ndef get_config():\n  c = default.get_config()\n'
    '  del c["seed"]\n  return c\n',
    'from configs import default\ndef get_config(arg):\n  return default.get_config()\n',
    'from configs import default\ndef get_config():\n  c = default.get_config()\n'
    '  c.model.name = "no_such_net"\n  return c\n',
])


@SETTINGS
@given(_FILE_BODIES, st.sampled_from(['', ':x']))
def test_bad_config_files_raise_config_error_naming_the_file(tmp_path, body, arg):
  path = tmp_path / 'bad_config.py'
  path.write_text(body)
  if 'get_config(arg)' in body and arg:
    config_lib.load_config(str(path) + arg)  # The one good combination.
    return
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.load_config(str(path) + arg)
  _one_line(info.value)
  if 'batch_sise' in body and not arg:
    assert "unknown config key 'batch_sise'" in str(info.value)
  else:  # Names the key at fault, or else the file.
    text = str(info.value)
    assert 'config.' in text or 'config key' in text or 'has no key' in text or (
        str(path) in text), text


# ----------------------------------------------------------------------- data readers


class FuzzSeg(base.SegmentationBuilder):
  """Three classes; only ``make_example`` is used (nothing is built)."""
  VERSION = tfds.core.Version('1.0.0')
  CLASS_NAMES = ('a', 'b', 'c')
  PALETTE = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'none'

  def _split_generators(self, dl_manager):
    raise NotImplementedError

  def _generate_examples(self):
    raise NotImplementedError


@pytest.fixture(scope='module')
def builder(tmp_path_factory):
  return FuzzSeg(data_dir=str(tmp_path_factory.mktemp('fuzzseg')))


def _encode(array: np.ndarray, mode: str | None, fmt: str) -> bytes:
  buf = io.BytesIO()
  image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
  image.save(buf, format=fmt)
  return buf.getvalue()


@st.composite
def image_files(draw):
  """Encoded images: valid, truncated, bit-flipped, random bytes, odd modes."""
  h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
  kind = draw(st.sampled_from(['png', 'jpeg', 'random', 'truncated', 'flipped', 'mode',
                               'empty', 'huge_header']))
  rgb = np.asarray(draw(st.lists(st.integers(0, 255), min_size=h * w * 3,
                                 max_size=h * w * 3)), np.uint8).reshape(h, w, 3)
  if kind == 'random':
    return draw(st.binary(max_size=64)), (h, w)
  if kind == 'empty':
    return b'', (h, w)
  if kind == 'huge_header':  # A valid PNG header (with its CRC) claiming 60000 x 60000.
    good = _encode(rgb, None, 'PNG')
    ihdr = good[12:16] + (60000).to_bytes(4, 'big') * 2 + good[24:29]
    return good[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, 'big') + good[33:], (h, w)
  if kind == 'mode':
    mode = draw(st.sampled_from(['L', 'RGBA', 'P', 'CMYK', 'I', 'F', '1', 'LA']))
    fmt = 'TIFF' if mode in ('I', 'F', 'CMYK') else 'PNG'
    return _encode(rgb, mode, fmt), (h, w)
  data = _encode(rgb, None, 'JPEG' if kind == 'jpeg' else 'PNG')
  if kind == 'truncated':
    data = data[:draw(st.integers(0, len(data) - 1))]
  elif kind == 'flipped':
    i = draw(st.integers(0, len(data) - 1))
    data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
  return data, (h, w)


@st.composite
def label_files(draw, hw):
  """Labels as arrays, PNG bytes (palette / grey / RGB / 16-bit) or garbage."""
  h, w = hw
  if draw(st.booleans()):  # Sometimes the wrong size.
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
  values = st.sampled_from([0, 1, 2, 255]) if draw(st.booleans()) else st.integers(0, 300)
  lab = np.asarray(draw(st.lists(values, min_size=h * w, max_size=h * w))).reshape(h, w)
  kind = draw(st.sampled_from(['array', 'array3d', 'float', 'png_l', 'png_p', 'png_rgb',
                               'png_16', 'garbage', 'none', 'callable_raises']))
  if kind == 'array':
    return lab.astype(np.int32)
  if kind == 'array3d':
    return lab.astype(np.int32)[..., None].repeat(draw(st.sampled_from([1, 2])), -1)
  if kind == 'float':
    return lab.astype(np.float32)
  if kind == 'none':
    return None
  if kind == 'garbage':
    return draw(st.binary(max_size=40))
  if kind == 'callable_raises':
    def missing():
      raise base.BadInputError('img.png: no label file')
    return missing
  small = np.clip(lab, 0, 255).astype(np.uint8)
  if kind == 'png_l':
    return _encode(small, 'L', 'PNG')
  if kind == 'png_p':
    return _encode(small, 'P', 'PNG')
  if kind == 'png_rgb':
    return _encode(np.stack([small] * 3, -1), None, 'PNG')
  buf = io.BytesIO()
  Image.fromarray(lab.astype(np.uint16)).save(buf, format='PNG')
  return buf.getvalue()


@SETTINGS
@given(st.data())
def test_make_example_returns_valid_records_or_bad_input_error(builder, data):
  image, hw = data.draw(image_files())
  label = data.draw(label_files(hw))
  use_map = data.draw(st.booleans())
  table = np.full(256, -1, np.int64)
  table[:3], table[255] = (0, 1, 2), 255
  try:
    key, example = builder.make_example(image, label, 'ex0', label_map=table if use_map else None,
                                        image_name='img.png', label_name='lab.png')
  except base.BadInputError as e:
    _one_line(e)
    assert str(e).startswith(('img.png', 'lab.png')), str(e)  # Names the file at fault.
    return
  assert key == 'ex0'
  stored = np.asarray(Image.open(io.BytesIO(example['label'])))
  decoded = np.asarray(Image.open(io.BytesIO(example['image'])).convert('RGB'))
  assert stored.dtype == np.uint8 and stored.shape == decoded.shape[:2]
  assert set(np.unique(stored)) <= {0, 1, 2, 255}


@SETTINGS
@given(st.data())
def test_read_label_png_returns_ids_or_bad_input_error(tmp_path, data):
  # Label PNGs, images (any mode, corrupt, huge headers) or noise.
  source = data.draw(st.one_of(label_files((5, 4)).filter(lambda x: isinstance(x, bytes)),
                               image_files().map(lambda x: x[0]), st.binary(max_size=80)))
  as_path = data.draw(st.booleans())
  if as_path:
    path = tmp_path / 'label.png'
    path.write_bytes(source)
    source = str(path)
  try:
    label = base.read_label_png(source, 'label.png')
  except base.BadInputError as e:
    _one_line(e)
    assert str(e).startswith('label.png'), str(e)
    return
  assert label.ndim == 2 and np.issubdtype(label.dtype, np.integer)


@SETTINGS
@given(st.lists(st.integers(-5, 40), min_size=0, max_size=20),
       st.lists(st.integers(-1, 5), min_size=1, max_size=30))
def test_apply_label_map_maps_or_raises(raw, table):
  raw, table = np.asarray(raw, np.int64), np.asarray(table, np.int64)
  try:
    out = base.apply_label_map(raw, table, 'f.png')
  except base.BadInputError as e:
    _one_line(e)
    assert str(e).startswith('f.png')
    return
  np.testing.assert_array_equal(out, table[raw])


_DTYPES = st.sampled_from([np.uint8, np.int32, np.int64, np.uint16, np.float32, np.bool_])


@st.composite
def records(draw):
  """Prepared records as a reader might meet them: good, odd shapes/dtypes, missing keys."""
  kind = draw(st.sampled_from(['good', 'good', 'shape', 'no_label', 'not_dict', 'ragged']))
  name = draw(st.sampled_from([b'img_7', 'img_7', None]))
  if kind == 'not_dict':
    return draw(st.sampled_from([None, 3, 'label']))
  if kind == 'no_label':
    return {'file_name': name}
  if kind == 'ragged':
    return {'label': [[1, 2], [3]], 'file_name': name}
  shape = ((draw(st.integers(0, 5)), draw(st.integers(0, 5)), 1) if kind == 'good'
           else tuple(draw(st.lists(st.integers(0, 3), max_size=4))))
  dtype = np.uint8 if kind == 'good' else draw(_DTYPES)
  size = int(np.prod(shape))
  values = draw(st.lists(st.integers(0, 300), min_size=size, max_size=size))
  return {'label': np.asarray(values).astype(dtype).reshape(shape), 'file_name': name}


@SETTINGS
@given(st.lists(records(), min_size=1, max_size=4))
def test_check_source_reports_or_raises_bad_input(source):
  from semseg_jax.data import check  # pylint: disable=g-import-not-at-top
  info = data_lib.get_dataset_info('shapes')
  try:
    report = check.check_source(source, info, 'train')
  except data_lib.BadInputError as e:
    _one_line(e)
    assert str(e).startswith(('img_7', 'record ')), str(e)
    return
  assert report.num_images == len(source)
  labelled = sum(int(np.asarray(r['label']).size) for r in source)
  bad = sum(int(np.count_nonzero(
      (np.asarray(r['label']) >= info.num_classes) & (np.asarray(r['label']) != 255)))
            for r in source)
  assert int(report.pixels.sum()) + report.ignore_pixels + bad == labelled
  assert bool(report.bad_files) == (bad > 0)


def _huge_png() -> bytes:
  good = _encode(np.zeros((4, 4), np.uint8), None, 'PNG')
  ihdr = good[12:16] + (60000).to_bytes(4, 'big') * 2 + good[24:29]
  return good[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, 'big') + good[33:]


def test_decompression_bomb_headers_are_bad_input(builder):
  # PIL refuses > 179M pixels with its own exception type, not an OSError.
  with pytest.raises(base.BadInputError, match='bomb.png: unreadable label image'):
    base.read_label_png(_huge_png(), 'bomb.png')
  with pytest.raises(base.BadInputError, match='bomb.png: unreadable image'):
    builder.make_example(_huge_png(), None, 'x', image_name='bomb.png')


def test_missing_files_and_datasets_raise_documented_errors(tmp_path, builder):
  with pytest.raises(base.BadInputError, match='nothere.jpg'):
    builder.make_example(str(tmp_path / 'nothere.jpg'), None, 'x')
  with pytest.raises(base.BadInputError, match='nolabel.png'):
    base.read_label_png(str(tmp_path / 'nolabel.png'))
  with pytest.raises(data_lib.DatasetNotFoundError, match='no_such_dataset'):
    data_lib.get_dataset_info('no_such_dataset')
  cfg = config_lib.load_config('quickstart').dataset
  cfg.unlock()
  cfg.name = 'voc2012'
  with pytest.raises(data_lib.DatasetNotFoundError, match=str(tmp_path / 'empty')):
    data_lib.get_source(cfg, 'train', data_dir=str(tmp_path / 'empty'))


def test_error_types_are_value_errors():
  # Callers can catch ValueError for all bad input; each type is distinct.
  for error in (config_lib.ConfigError, data_lib.DatasetNotFoundError, base.BadInputError):
    assert issubclass(error, ValueError)
  assert base.BadInputError is data_lib.BadInputError  # One type for every reader.
  assert len({config_lib.ConfigError, data_lib.DatasetNotFoundError, base.BadInputError}) == 3
