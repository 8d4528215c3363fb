"""Shared base of the segmentation dataset builders (TFDS, ArrayRecord, no TensorFlow).

Every builder emits examples ``{'image': uint8 [H, W, 3], 'label': uint8
[H, W, 1] (class ids 0..K-1, 255 = ignore), 'file_name': str}``; the label is
stored as a greyscale PNG so every decoder (PIL, OpenCV, TF) yields class ids,
never palette colours. Read back with ``tfds.data_source`` the features decode
with PIL / numpy only.

A builder subclasses :class:`SegmentationBuilder`, sets ``CLASS_NAMES``,
``PALETTE``, ``MANUAL_DOWNLOAD_INSTRUCTIONS``, ``VERSION`` and implements
``_split_generators`` / ``_generate_examples``, turning each raw pair into an
example with :meth:`SegmentationBuilder.make_example`, which validates it.

Bad input (an unreadable or truncated image, a label of the wrong size, a label
value that is not a class id) raises :class:`BadInputError` with one line that
names the file; built with ``skip_bad=True`` the example is skipped instead and
counted in ``builder.skipped`` (split name -> count).
"""
from __future__ import annotations

import io
import os
import tarfile
from typing import Any, Callable, Iterable, Sequence, Union
import zipfile

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from semseg_jax import data as data_lib

IGNORE = 255

# What `make_example` accepts as a label: class ids, encoded PNG bytes or a
# path to a PNG (its raw pixel values, i.e. palette indices for palette PNGs),
# or a function returning class ids (called lazily so its errors can be
# skipped with ``skip_bad``).
LabelLike = Union[None, np.ndarray, bytes, str, os.PathLike, Callable[[], Any]]
ImageLike = Union[bytes, str, os.PathLike]


# A raw image or label is unusable; the message names the file and the problem.
# Defined in semseg_jax.data (which does not import TFDS) so that every reader
# raises the same type.
BadInputError = data_lib.BadInputError


def encode_png_gray(label: np.ndarray) -> bytes:
  """Encodes a uint8 ``[H, W]`` (or ``[H, W, 1]``) array as a greyscale (mode L) PNG."""
  label = np.asarray(label)
  if label.ndim == 3 and label.shape[-1] == 1:
    label = label[..., 0]
  if label.ndim != 2 or label.dtype != np.uint8:
    raise ValueError(f'encode_png_gray needs uint8 [H, W], got {label.dtype} {label.shape}')
  buf = io.BytesIO()
  Image.fromarray(label, mode='L').save(buf, format='PNG')
  return buf.getvalue()


def read_label_png(source: bytes | str | os.PathLike, name: str | None = None) -> np.ndarray:
  """Raw pixel values of a single-channel PNG: palette indices or grey levels.

  Args:
    source: encoded bytes or a path.
    name: the file name used in errors (default: the path).

  Returns:
    uint8 ``[H, W]`` (uint16 / int32 for 16-bit PNGs).

  Raises:
    BadInputError: unreadable, truncated, too large (PIL's decompression-bomb
      limit), or not a single-channel image.
  """
  name = name or (os.fspath(source) if not isinstance(source, bytes) else '<bytes>')
  try:
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
      img.load()
      mode = img.mode
      if mode not in ('P', 'L', 'I', 'I;16', '1'):
        raise BadInputError(f'{name}: label image has mode {mode}, expected a palette '
                            'or greyscale PNG (class ids, not colours)')
      arr = np.asarray(img)
  except BadInputError:
    raise
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise BadInputError(f'{name}: unreadable label image ({one_line(e)})') from None
  if arr.dtype == bool:
    arr = arr.astype(np.uint8)
  return arr


def manual_dir_or_none(dl_manager: Any) -> str | None:
  """``dl_manager.manual_dir`` as a string, or None when not given / missing / empty."""
  try:
    return os.fspath(dl_manager.manual_dir)
  except (AssertionError, ValueError):  # TFDS's way of saying "no usable manual_dir".
    return None


def require_manual_dir(dl_manager: Any, expected: Sequence[str]) -> str:
  """The manual_dir; raises FileNotFoundError listing ``expected`` when there is none."""
  root = manual_dir_or_none(dl_manager)
  if root is None:
    where = getattr(dl_manager, '_manual_dir', None)
    raise FileNotFoundError(f'manual_dir={where} is missing or empty; expected there: '
                            f'{", ".join(expected)}')
  return root


def require_paths(root: str | os.PathLike, relative: Iterable[str], what: str = '') -> None:
  """Checks that every ``root/relative`` exists.

  Raises:
    FileNotFoundError: one error listing every missing path (and ``what`` hints).
  """
  root = os.fspath(os.path.expanduser(root)) if root is not None else '<no manual_dir>'
  missing = [p for p in relative if not os.path.exists(os.path.join(root, p))]
  if missing:
    hint = f' {what}' if what else ''
    raise FileNotFoundError(f'missing in manual_dir={root}: {", ".join(missing)}{hint}')


def extract_archive(archive: str | os.PathLike, out_root: str | os.PathLike) -> str:
  """Extracts a .tar / .tar.gz / .tgz / .zip into ``out_root/<archive name>``; returns that.

  Our own extraction: TFDS's extractor needs TensorFlow. Extraction is skipped
  when a previous one completed (a ``.done`` marker), and tar members cannot
  escape the target folder (``filter='data'``).
  """
  archive = os.fspath(archive)
  out = os.path.join(os.fspath(out_root), os.path.basename(archive) + '.extracted')
  marker = out + '.done'
  if os.path.exists(marker):
    return out
  os.makedirs(out, exist_ok=True)
  try:
    if zipfile.is_zipfile(archive):
      with zipfile.ZipFile(archive) as z:
        z.extractall(out)
    else:
      with tarfile.open(archive) as tar:
        tar.extractall(out, filter='data')
  except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
    raise BadInputError(f'{archive}: cannot extract ({one_line(e)})') from None
  open(marker, 'w').close()
  return out


def dataset_info(name: str, class_names: Sequence[str], palette: Any) -> data_lib.DatasetInfo:
  """The registry ``DatasetInfo`` (ignore index 255) for static class names / palette."""
  return data_lib.DatasetInfo(name, len(class_names), tuple(class_names),
                              np.asarray(palette, np.uint8))


def one_line(e: BaseException) -> str:
  """``e`` as one line of text (for errors that must fit one line)."""
  text = ' '.join(str(e).split())
  return text or type(e).__name__


def _decode_image(image: ImageLike, name: str) -> tuple[bytes, tuple[int, int]]:
  """Validates an encoded RGB image; returns (bytes to store, (H, W)).

  Original bytes are stored when the image is 8-bit RGB JPEG / PNG (no
  re-encoding loss); greyscale, CMYK, palette or alpha images are converted to
  RGB and stored as PNG, so every record decodes to [H, W, 3]. (Encoded bytes,
  never arrays, go to TFDS: it encodes arrays with TensorFlow.)
  """
  try:
    if isinstance(image, bytes):
      raw = image
    else:
      with open(image, 'rb') as f:
        raw = f.read()
    with Image.open(io.BytesIO(raw)) as img:
      img.load()  # Decodes everything: truncated files fail here.
      size = (img.height, img.width)
      if img.mode == 'RGB' and img.format in ('JPEG', 'PNG'):
        return raw, size
      buf = io.BytesIO()
      img.convert('RGB').save(buf, format='PNG')
      return buf.getvalue(), size
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise BadInputError(f'{name}: unreadable image ({one_line(e)})') from None


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the builders: features, metadata, validation and ``skip_bad``.

  Subclasses set ``CLASS_NAMES`` (K names), ``PALETTE`` (``[K, 3]`` uint8),
  ``MANUAL_DOWNLOAD_INSTRUCTIONS``, ``VERSION`` / ``RELEASE_NOTES`` and
  optionally ``HOMEPAGE`` / ``CITATION``. Built datasets default to the
  ArrayRecord format (random access with ``tfds.data_source``).
  """

  CLASS_NAMES: tuple[str, ...] = ()
  PALETTE: Any = ()
  HOMEPAGE: str | None = None
  CITATION: str | None = None
  DESCRIPTION: str = ''

  def __init__(self, *, skip_bad: bool = False, file_format: Any = None, **kwargs):
    """See ``tfds.core.GeneratorBasedBuilder``.

    Args:
      skip_bad: skip (and count) bad examples instead of stopping the build.
      file_format: record format; default ArrayRecord.
      **kwargs: ``data_dir``, ``config``, ``version``, ...
    """
    super().__init__(file_format=file_format or 'array_record', **kwargs)
    self.skip_bad = skip_bad
    self.skipped: dict[str, int] = {}

  @property
  def num_classes(self) -> int:
    return len(self.CLASS_NAMES)

  def _info(self) -> tfds.core.DatasetInfo:
    palette = np.asarray(self.PALETTE, np.uint8)
    if palette.shape != (self.num_classes, 3):
      raise ValueError(f'{type(self).__name__}: palette shape {palette.shape}, expected '
                       f'({self.num_classes}, 3)')
    # DatasetInfo directly, not `dataset_info_from_configs`: the latter reads
    # README/CITATIONS files from a per-dataset package directory we do not have.
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION or f'{self.name} semantic segmentation',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
            'label': tfds.features.Image(shape=(None, None, 1), dtype=np.uint8,
                                         encoding_format='png'),
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        homepage=self.HOMEPAGE,
        citation=self.CITATION,
        metadata=tfds.core.MetadataDict(
            class_names=list(self.CLASS_NAMES), palette=palette.tolist(),
            ignore_index=IGNORE),
    )

  def registry_info(self) -> data_lib.DatasetInfo:
    """This dataset's registry ``DatasetInfo``."""
    return dataset_info(self.name, self.CLASS_NAMES, self.PALETTE)

  def make_example(self, image: ImageLike, label: LabelLike, file_name: str, *,
                   label_map: np.ndarray | None = None, split: str = '',
                   label_name: str | None = None,
                   image_name: str | None = None) -> tuple[str, dict[str, Any]] | None:
    """Validates one raw pair and returns ``(key, example)``, or None if skipped.

    Args:
      image: path to, or encoded bytes of, an RGB image (JPEG / PNG).
      label: class ids ``[H, W]``; a PNG (path or bytes) whose raw pixel values
        are read; a function returning either; or None for "unlabelled" (all
        255, e.g. a test split without public labels).
      file_name: the example's name (also its key; unique within the split).
      label_map: optional int ``[N]`` table raw value -> class id (255 =
        ignore, -1 = invalid raw value) applied to the label's raw values.
      split: the split name, for the skip counter.
      label_name: the label file name used in errors (default: its path or
        ``file_name``).
      image_name: the image file name used in errors (default: its path or
        ``file_name``).

    Raises:
      BadInputError: the pair is bad and ``skip_bad`` is off.
    """
    try:
      return file_name, self._example(image, label, file_name, label_map, label_name,
                                      image_name)
    except BadInputError as e:
      if not self.skip_bad:
        raise
      self.skipped[split] = self.skipped.get(split, 0) + 1
      logging.warning('skipping bad example (skip_bad): %s', e)
      return None

  def _example(self, image, label, file_name, label_map, label_name,
               image_name) -> dict[str, Any]:
    if image_name is None:
      image_name = file_name if isinstance(image, bytes) else os.fspath(image)
    if label_name is None:
      label_name = (os.fspath(label) if isinstance(label, (str, os.PathLike)) else file_name)
    stored_image, size = _decode_image(image, image_name)
    if label is None:  # Unlabelled (e.g. a test split): all ignore.
      label = np.full(size, IGNORE, np.uint8)
    elif callable(label):
      label = label()
    if isinstance(label, (bytes, str, os.PathLike)):
      label = read_label_png(label, label_name)
    label = np.asarray(label)
    if label.ndim == 3 and label.shape[-1] == 1:
      label = label[..., 0]
    if label.ndim != 2:
      raise BadInputError(f'{label_name}: label has shape {label.shape}, expected [H, W]')
    if label.shape != size:
      raise BadInputError(f'{label_name}: label size {label.shape[1]}x{label.shape[0]} '
                          f'(WxH) does not match image {image_name} size {size[1]}x{size[0]}')
    if not np.issubdtype(label.dtype, np.integer):
      raise BadInputError(f'{label_name}: label dtype {label.dtype} is not integer')
    if label_map is not None:
      label = apply_label_map(label, label_map, label_name)
    bad = label.astype(np.int64)
    bad = (bad < 0) | ((bad >= self.num_classes) & (bad != IGNORE))
    if bad.any():
      values = np.unique(label[bad])
      raise BadInputError(f'{label_name}: label values {_fmt(values)} are not class ids '
                          f'0..{self.num_classes - 1} or {IGNORE} (ignore)')
    return {'image': stored_image, 'label': encode_png_gray(label.astype(np.uint8)),
            'file_name': file_name}


def _fmt(values: np.ndarray, limit: int = 8) -> str:
  shown = ', '.join(str(int(v)) for v in values[:limit])
  return f'[{shown}{", ..." if len(values) > limit else ""}]'


def apply_label_map(raw: np.ndarray, table: np.ndarray, name: str) -> np.ndarray:
  """Maps raw label values through ``table`` (-1 entries = invalid raw values).

  Returns:
    uint8 class ids.

  Raises:
    BadInputError: a raw value is negative, beyond the table, or maps to -1.
  """
  table = np.asarray(table)
  raw = np.asarray(raw)
  if raw.size and (raw.min() < 0 or raw.max() >= len(table)):
    values = np.unique(raw[(raw < 0) | (raw >= len(table))])
    raise BadInputError(f'{name}: raw label values {_fmt(values)} out of range '
                        f'0..{len(table) - 1}')
  out = table[raw]
  if (out < 0).any():
    raise BadInputError(f'{name}: raw label values {_fmt(np.unique(raw[out < 0]))} have no '
                        'class (not in the label table)')
  return out.astype(np.uint8)


def voc_colormap(n: int = 256, offset: int = 0) -> np.ndarray:
  """The PASCAL VOC palette: uint8 ``[n, 3]`` colours of ids ``offset..offset+n-1``.

  Bit ``3k + c`` of the id sets bit ``7 - k`` of channel c (R, G, B), so ids
  0..20 get the familiar VOC colours and 255 (void) is (224, 224, 192).
  pytorch-semseg also draws NYUv2 / SUN-RGBD raw ids with it (``offset=1`` keeps
  class ``i``, raw id ``i + 1``, in its upstream colour).
  """
  ids = np.arange(offset, offset + n)
  cmap = np.zeros((n, 3), np.int64)
  for k in range(8):
    for c in range(3):
      cmap[:, c] |= ((ids >> (3 * k + c)) & 1) << (7 - k)
  return cmap.astype(np.uint8)


def missing_label(image_path: str, expected: str):
  """A label stand-in that raises (so ``skip_bad`` can skip an image with no label)."""

  def fail() -> np.ndarray:
    raise BadInputError(f'{image_path}: no label file; expected {expected}')

  return fail
