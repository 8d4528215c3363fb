"""Metric writers: TensorBoard event files and JSONL, without TensorFlow.

``clu.metric_writers`` imports TensorFlow, which this project never imports.
TensorBoard's file format is small enough to write directly: a TFRecord file
(``uint64 length, masked crc32c(length), data, masked crc32c(data)``, all
little-endian) of ``tensorflow.Event`` protocol buffers, which we encode by
hand (field numbers from tensorflow/core/util/event.proto and
tensorflow/core/framework/summary.proto).

The writer classes follow the method names of ``clu.metric_writers``
(``write_scalars``, ``write_images``, ``write_texts``, ``write_hparams``,
``flush``, ``close``) so the training loop reads the same. Paths are local
(or a mounted file system): ``gs://`` is not supported.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import io
import json
import math
import os
import socket
import struct
import time
from typing import Any

from absl import logging
import numpy as np

# --------------------------------------------------------------------------
# CRC-32C (Castagnoli), as TFRecord framing requires.

_CRC_POLY = 0x82F63B78  # Castagnoli polynomial, bit-reflected


def _make_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (_CRC_POLY if crc & 1 else 0)
    table.append(crc)
  return table


_TABLE = _make_table()
_TABLE_NP = np.array(_TABLE, np.uint32)
# Inputs at least this long use the chunked numpy path (a python byte loop
# runs at about 5 MB/s; a PNG summary is easily 1 MB).
_VECTOR_MIN_BYTES = 1 << 15
_CHUNK = 1024
_shift_tables: np.ndarray | None = None


def _update_py(crc: int, data: bytes) -> int:
  table = _TABLE
  for b in data:
    crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc


def _update_np(state: np.ndarray, columns: np.ndarray) -> np.ndarray:
  """Runs n CRC registers at once; ``columns`` [L, n] holds their bytes."""
  for row in columns:
    state = _TABLE_NP[(state ^ row) & 0xFF] ^ (state >> 8)
  return state


def _get_shift_tables() -> np.ndarray:
  """[4, 256] tables of Z(s): the register after _CHUNK zero bytes from s.

  The register update is linear over GF(2), so Z(s) is the XOR of Z applied
  to each byte of s in place, which these tables hold.
  """
  global _shift_tables
  if _shift_tables is None:
    basis = (np.arange(256, dtype=np.uint32)[None, :]
             << (8 * np.arange(4, dtype=np.uint32))[:, None]).reshape(-1)
    zeros = np.zeros((_CHUNK, basis.size), np.uint32)
    _shift_tables = _update_np(basis, zeros).reshape(4, 256)
  return _shift_tables


def _update(crc: int, data: bytes) -> int:
  if len(data) < _VECTOR_MIN_BYTES:
    return _update_py(crc, data)
  n = len(data) // _CHUNK
  # Registers of all chunks from state 0 at once, then chained in order:
  # R(s, A + B) = Z_{|B|}(R(s, A)) ^ R(0, B).
  chunks = np.frombuffer(data, np.uint8, count=n * _CHUNK).reshape(n, _CHUNK)
  columns = np.ascontiguousarray(chunks.T, dtype=np.uint32)
  regs = _update_np(np.zeros(n, np.uint32), columns).tolist()
  t0, t1, t2, t3 = (t.tolist() for t in _get_shift_tables())
  for r in regs:
    crc = (t0[crc & 0xFF] ^ t1[(crc >> 8) & 0xFF] ^ t2[(crc >> 16) & 0xFF]
           ^ t3[crc >> 24] ^ r)
  return _update_py(crc, data[n * _CHUNK:])


def crc32c(data: bytes) -> int:
  """CRC-32C of ``data`` as an unsigned 32-bit int."""
  return _update(0xFFFFFFFF, bytes(data)) ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC: rotate right by 15, add a constant (mod 2**32)."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_frame(data: bytes) -> bytes:
  """One TFRecord: length, masked crc of length, data, masked crc of data."""
  header = struct.pack('<Q', len(data))
  return (header + struct.pack('<I', masked_crc32c(header)) + data
          + struct.pack('<I', masked_crc32c(data)))


# --------------------------------------------------------------------------
# Protocol-buffer encoding of the few messages TensorBoard reads.


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # negative int64 as two's complement, 10 bytes
  out = bytearray()
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _field_varint(number: int, value: int) -> bytes:
  return _varint(number << 3) + _varint(value)


def _field_bytes(number: int, value: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(value)) + value


def _field_double(number: int, value: float) -> bytes:
  return _varint(number << 3 | 1) + struct.pack('<d', value)


def _field_float(number: int, value: float) -> bytes:
  return _varint(number << 3 | 5) + struct.pack('<f', value)


def _event(step: int, wall_time: float, *, summary_values: Sequence[bytes] = (),
           file_version: str | None = None) -> bytes:
  """Encodes ``Event{wall_time=1, step=2, file_version=3, summary=5}``."""
  out = _field_double(1, wall_time) + _field_varint(2, int(step))
  if file_version is not None:
    out += _field_bytes(3, file_version.encode())
  if summary_values:
    # Summary{repeated Value value = 1}
    out += _field_bytes(5, b''.join(_field_bytes(1, v) for v in summary_values))
  return out


def _scalar_value(tag: str, value: float) -> bytes:
  # Value{tag=1, simple_value=2}
  return _field_bytes(1, tag.encode()) + _field_float(2, value)


def _image_value(tag: str, png: bytes, height: int, width: int,
                 channels: int) -> bytes:
  # Value{tag=1, image=4: Image{height=1, width=2, colorspace=3,
  # encoded_image_string=4}}; colorspace is the channel count (1, 3 or 4).
  image = (_field_varint(1, height) + _field_varint(2, width)
           + _field_varint(3, channels) + _field_bytes(4, png))
  return _field_bytes(1, tag.encode()) + _field_bytes(4, image)


def _text_value(tag: str, text: str) -> bytes:
  # Value{tag=1, metadata=9, tensor=8}: a scalar DT_STRING TensorProto
  # {dtype=1: 7, tensor_shape=2: {}, string_val=8} with SummaryMetadata
  # {plugin_data=1: {plugin_name=1: "text"}}, as tf.summary.text writes.
  tensor = (_field_varint(1, 7) + _field_bytes(2, b'')
            + _field_bytes(8, text.encode()))
  metadata = _field_bytes(1, _field_bytes(1, b'text'))
  return (_field_bytes(1, tag.encode()) + _field_bytes(9, metadata)
          + _field_bytes(8, tensor))


def _encode_png(tag: str, image: np.ndarray) -> tuple[bytes, int, int, int]:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if image.ndim == 2:
    image = image[..., None]
  height, width, channels = image.shape
  if channels not in (1, 3, 4):
    raise ValueError(f'image {tag!r}: expected 1, 3 or 4 channels, got '
                     f'shape {image.shape}')
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  buf = io.BytesIO()
  pil.save(buf, format='PNG')
  return buf.getvalue(), height, width, channels


def _scalar(key: str, value: Any) -> float | int:
  arr = np.asarray(value)
  if arr.size != 1 or arr.dtype.kind not in 'biuf':
    raise ValueError(f'scalar {key!r} must be a single number, got '
                     f'{type(value).__name__} of shape {arr.shape} and dtype '
                     f'{arr.dtype}')
  item = arr.reshape(()).item()
  return float(item) if isinstance(item, float) else int(item)


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if hasattr(value, 'to_dict'):  # ml_collections.ConfigDict
      value = value.to_dict()
    if isinstance(value, Mapping):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


# --------------------------------------------------------------------------
# Writers.


class MetricWriter:
  """The writer interface (a subset of ``clu.metric_writers.MetricWriter``).

  Methods a writer does not support are no-ops.
  """

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes ``{name: number}`` (python, numpy or jax scalars) at ``step``."""

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """Writes uint8 images ``[H, W, C]`` or ``[N, H, W, C]``, C in {1, 3, 4}."""

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Writes ``{name: text}`` (markdown in TensorBoard)."""

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Writes the run's hyper-parameters (nested mappings are flattened)."""

  def flush(self) -> None:
    """Makes everything written so far visible to readers."""

  def close(self) -> None:
    """Flushes and releases files; the writer is unusable afterwards."""

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class TensorBoardWriter(MetricWriter):
  """Writes a TensorBoard event file ``events.out.tfevents.<time>.<host>``.

  Each instance opens a new file in ``logdir``, so a resumed run adds a file
  next to the old ones and TensorBoard reads them together. Every write call
  is flushed to the operating system.
  """

  def __init__(self, logdir: str | os.PathLike[str]):
    self.logdir = os.fspath(logdir)
    os.makedirs(self.logdir, exist_ok=True)
    now = time.time()
    name = f'events.out.tfevents.{int(now)}.{socket.gethostname()}'
    base = os.path.join(self.logdir, name)
    path, n = base, 0
    while os.path.exists(path):  # two writers in the same second
      n += 1
      path = f'{base}.{n}'
    self.path = path
    self._file = open(path, 'xb')
    self._write(_event(0, now, file_version='brain.Event:2'))

  def _write(self, event: bytes) -> None:
    if self._file is None:
      raise ValueError(f'TensorBoardWriter for {self.path} is closed')
    self._file.write(tfrecord_frame(event))
    self._file.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    values = [_scalar_value(k, _scalar(k, v)) for k, v in scalars.items()]
    if values:
      self._write(_event(step, time.time(), summary_values=values))

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    values = []
    for tag, image in images.items():
      image = np.asarray(image)
      if image.dtype != np.uint8 or image.ndim not in (2, 3, 4):
        raise ValueError(f'image {tag!r} must be uint8 [H,W,C] or [N,H,W,C], '
                         f'got {image.dtype} {image.shape}')
      batch = image[None] if image.ndim < 4 else image
      for i, single in enumerate(batch):
        name = tag if len(batch) == 1 else f'{tag}/{i}'
        values.append(_image_value(name, *_encode_png(name, single)))
    if values:
      self._write(_event(step, time.time(), summary_values=values))

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    values = [_text_value(tag, str(text)) for tag, text in texts.items()]
    if values:
      self._write(_event(step, time.time(), summary_values=values))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Writes a markdown table ``| name | value |`` as text tag 'hparams'."""
    rows = [f'| {k} | {v!r} |' for k, v in sorted(_flatten(hparams).items())]
    table = '\n'.join(['| name | value |', '|---|---|'] + rows)
    self.write_texts(0, {'hparams': table})

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


def _json_number(value: float | int) -> float | int | None:
  # JSON has no NaN or infinity: write null, so every line is strict JSON.
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


class JsonlWriter(MetricWriter):
  """Appends one JSON object per ``write_scalars`` call to ``path``.

  Each line is ``{"step": s, name: value, ...}``; NaN and infinities are
  written as ``null``. The file is opened for appending, so a resumed run
  continues it (steps logged after the last checkpoint of a crashed run then
  appear twice; readers keep the last line per step). Images, texts and
  hparams are not written.
  """

  def __init__(self, path: str | os.PathLike[str]):
    self.path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    self._file = open(self.path, 'a', encoding='utf-8')

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if 'step' in scalars:
      raise ValueError("JsonlWriter: scalar name 'step' is reserved")
    if self._file is None:
      raise ValueError(f'JsonlWriter for {self.path} is closed')
    record = {'step': int(step)}
    record.update({k: _json_number(_scalar(k, v)) for k, v in scalars.items()})
    self._file.write(json.dumps(record, allow_nan=False) + '\n')
    self._file.flush()

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


class LoggingWriter(MetricWriter):
  """Logs scalars (and image shapes) with absl logging; writes no file."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    text = ', '.join(f'{k}={_scalar(k, v):.6g}' for k, v in scalars.items())
    logging.info('[%d] %s', step, text)

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    shapes = ', '.join(f'{k}={np.shape(v)}' for k, v in images.items())
    logging.info('[%d] images: %s', step, shapes)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    logging.info('hparams: %s', _flatten(hparams))


class MultiWriter(MetricWriter):
  """Forwards every call to each writer in order."""

  def __init__(self, writers: Sequence[MetricWriter]):
    self.writers = list(writers)

  def write_scalars(self, step, scalars):
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_images(self, step, images):
    for w in self.writers:
      w.write_images(step, images)

  def write_texts(self, step, texts):
    for w in self.writers:
      w.write_texts(step, texts)

  def write_hparams(self, hparams):
    for w in self.writers:
      w.write_hparams(hparams)

  def flush(self):
    for w in self.writers:
      w.flush()

  def close(self):
    for w in self.writers:
      w.close()


def create_default_writer(workdir: str | os.PathLike[str],
                          *,
                          just_logging: bool | None = None,
                          jsonl_name: str = 'metrics.jsonl') -> MetricWriter:
  """The writer the trainer uses: TensorBoard + JSONL in workdir (the trainer logs
  its own one-line progress), or only logging on processes other than 0.

  Args:
    workdir: directory for the event file and ``jsonl_name``.
    just_logging: only log (no files). Defaults to ``jax.process_index() > 0``
      so that, on a multi-host run, only process 0 writes files.
    jsonl_name: file name of the JSONL log inside ``workdir``.
  """
  if just_logging is None:
    import jax  # pylint: disable=g-import-not-at-top
    just_logging = jax.process_index() > 0
  if just_logging:
    return LoggingWriter()
  workdir = os.fspath(workdir)
  return MultiWriter([TensorBoardWriter(workdir),
                      JsonlWriter(os.path.join(workdir, jsonl_name))])
