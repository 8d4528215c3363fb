"""Per-example numpy transforms for (image, label) pairs.

Images are ``[H, W, 3]`` (uint8, or float32 in 0-255 units after colour
jitter); labels are ``[H, W]`` integer class ids with ``ignore_index`` (255)
for "no label". Labels are only ever moved, flipped, padded with
``ignore_index`` or resized with NEAREST, so no transform creates a class id
that was not in its input. Random transforms take an explicit
``np.random.Generator``; the grain pipeline hands each example one seeded by
(seed, epoch, example index).

``TrainTransform`` and ``EvalTransform`` chain them as ``config.dataset``
asks (one key per transform).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from PIL import Image

IGNORE_INDEX = 255
Size = tuple[int, int]  # (H, W) in pixels.


def check_pair(image: np.ndarray, label: np.ndarray, where: str = 'record') -> tuple[
    np.ndarray, np.ndarray]:
  """Validates a record's arrays; returns ``(image uint8 [H,W,3], label uint8 [H,W])``.

  A ``[H, W, 1]`` label (TFDS stores masks as 1-channel images) is squeezed;
  wider integer labels are narrowed to uint8 (ids must be in 0..255).
  """
  image, label = np.asarray(image), np.asarray(label)
  if label.ndim == 3 and label.shape[-1] == 1:
    label = label[..., 0]
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f'{where}: image must be uint8 [H, W, 3], got {image.dtype} {image.shape}')
  if not np.issubdtype(label.dtype, np.integer):
    raise ValueError(f'{where}: label must hold integer class ids, got {label.dtype}')
  if label.shape != image.shape[:2]:
    raise ValueError(f'{where}: label shape {label.shape} does not match image '
                     f'shape {image.shape}')
  if label.dtype != np.uint8:
    if label.size and (label.min() < 0 or label.max() > 255):
      raise ValueError(f'{where}: label ids must be in 0..255, got {label.min()}..{label.max()}')
    label = label.astype(np.uint8)
  return image, label


def resize_image(image: np.ndarray, size: Size) -> np.ndarray:
  """Bilinear resize of a uint8 ``[H, W, 3]`` image to ``size`` (PIL, like the original)."""
  height, width = size
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def resize_label(label: np.ndarray, size: Size) -> np.ndarray:
  """Nearest-neighbour resize of a uint8 ``[H, W]`` label map (PIL NEAREST, like the original).

  Output pixel ``i`` takes input pixel ``floor((i + 0.5) * H_in / H_out)``, so
  only ids present in ``label`` appear in the result.
  """
  height, width = size
  if label.shape == (height, width):
    return label
  if label.dtype != np.uint8:
    raise ValueError(f'resize_label needs a uint8 label map, got {label.dtype}')
  return np.asarray(Image.fromarray(label).resize((width, height), Image.NEAREST))


def random_scale(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                 scale_range: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """Rescales both by one factor drawn uniformly from ``scale_range = (lo, hi)``."""
  lo, hi = scale_range
  scale = rng.uniform(lo, hi)
  h, w = label.shape
  size = (max(1, round(h * scale)), max(1, round(w * scale)))
  return resize_image(image, size), resize_label(label, size)


def _place(array: np.ndarray, size: Size, top: int, left: int, fill: Any) -> np.ndarray:
  """``out[y, x] = array[y + top, x + left]`` on a ``size`` canvas, ``fill`` elsewhere.

  Negative ``top``/``left`` (or a canvas larger than ``array``) pad.
  """
  height, width = size
  out = np.empty((height, width) + array.shape[2:], array.dtype)
  out[...] = fill
  h, w = array.shape[:2]
  y0, y1 = max(0, -top), min(height, h - top)
  x0, x1 = max(0, -left), min(width, w - left)
  if y0 < y1 and x0 < x1:
    out[y0:y1, x0:x1] = array[y0 + top:y1 + top, x0 + left:x1 + left]
  return out


def _fill_value(image: np.ndarray, image_fill: float | Sequence[float]) -> np.ndarray:
  fill = np.broadcast_to(np.asarray(image_fill, np.float64), (3,))
  if image.dtype == np.uint8:
    return np.clip(np.rint(fill), 0, 255).astype(np.uint8)
  return fill.astype(image.dtype)


def random_crop(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, size: Size,
                *, image_fill: float | Sequence[float] = 0.0,
                ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
  """A random ``size`` window; a side shorter than ``size`` is padded.

  Along each axis the window offset is uniform over every position that keeps
  the window inside the image (or, where the image is smaller, the image
  inside the window), so padding lands on either side. The image is padded
  with ``image_fill`` (a value or per-channel values, 0-255 units), the label
  with ``ignore_index``.
  """
  h, w = label.shape
  height, width = size
  top = int(rng.integers(min(0, h - height), max(0, h - height) + 1))
  left = int(rng.integers(min(0, w - width), max(0, w - width) + 1))
  return (_place(image, size, top, left, _fill_value(image, image_fill)),
          _place(label, size, top, left, ignore_index))


def random_flip(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, *,
                horizontal: bool = True, vertical: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Mirrors left-right and/or top-bottom, each with probability 1/2."""
  if horizontal and rng.random() < 0.5:
    image, label = image[:, ::-1], label[:, ::-1]
  if vertical and rng.random() < 0.5:
    image, label = image[::-1], label[::-1]
  return image, label


def color_jitter(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
  """Random brightness, contrast and saturation, each by a factor in ``1 +- strength``.

  Applied in that order, clipping to 0..255 after each (as torchvision does).

  Returns:
    float32 ``[H, W, 3]`` in 0..255.
  """
  out = np.asarray(image, np.float32)
  if strength <= 0:
    return out
  b, c, s = rng.uniform(1 - strength, 1 + strength, size=3).astype(np.float32)
  out = np.clip(out * b, 0, 255)
  gray = out @ np.asarray([0.299, 0.587, 0.114], np.float32)  # [H, W], ITU-R 601 luma.
  out = np.clip((out - gray.mean()) * c + gray.mean(), 0, 255)
  gray = out @ np.asarray([0.299, 0.587, 0.114], np.float32)
  return np.clip((out - gray[..., None]) * s + gray[..., None], 0, 255)


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """``(image - mean) / std`` per channel (0-255 units); float32 ``[H, W, 3]``."""
  mean = np.asarray(mean, np.float32)
  inv_std = 1.0 / np.asarray(std, np.float32)
  return (np.asarray(image, np.float32) - mean) * inv_std


def resize_pad_for_eval(image: np.ndarray, label: np.ndarray, size: Size, *,
                        image_fill: float | Sequence[float] = 0.0,
                        ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
  """Deterministically fits an example into ``size``.

  An image larger than ``size`` along either side is first shrunk, keeping
  its aspect ratio, until it fits (image bilinear, label nearest); then it is
  padded at the bottom/right to ``size`` (image ``image_fill``, label
  ``ignore_index``), so padding never counts in the metrics.
  """
  h, w = label.shape
  height, width = size
  if h > height or w > width:
    scale = min(height / h, width / w)
    fitted = (min(height, max(1, round(h * scale))), min(width, max(1, round(w * scale))))
    image, label = resize_image(image, fitted), resize_label(label, fitted)
  return (_place(image, size, 0, 0, _fill_value(image, image_fill)),
          _place(label, size, 0, 0, ignore_index))


@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """Training augmentation: scale -> crop -> flip -> colour jitter -> normalise.

  Called as ``transform(record, rng)`` (grain ``random_map``); returns
  ``{'image': float32 [H, W, 3] normalised, 'label': int32 [H, W]}`` with
  ``(H, W) = image_size``. Crop padding fills the image with ``mean`` (rounded to
  uint8, so ~0 after normalisation) and the label with ``ignore_index``.
  """
  image_size: Size
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  scale_range: tuple[float, float] | None = None
  hflip: bool = False
  vflip: bool = False
  color_jitter: float = 0.0
  ignore_index: int = IGNORE_INDEX

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    image, label = check_pair(record['image'], record['label'], record.get('file_name', 'record'))
    if self.scale_range is not None:
      image, label = random_scale(image, label, rng, self.scale_range)
    image, label = random_crop(image, label, rng, self.image_size, image_fill=self.mean,
                               ignore_index=self.ignore_index)
    image, label = random_flip(image, label, rng, horizontal=self.hflip, vertical=self.vflip)
    image = color_jitter(image, rng, self.color_jitter)
    return {'image': normalize(image, self.mean, self.std), 'label': label.astype(np.int32)}


@dataclasses.dataclass(frozen=True)
class EvalTransform:
  """Evaluation preprocessing: ``resize_pad_for_eval`` to ``image_size``, normalise.

  Returns ``{'image': float32 [H, W, 3], 'label': int32 [H, W]}``.
  """
  image_size: Size
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  ignore_index: int = IGNORE_INDEX

  def __call__(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    image, label = check_pair(record['image'], record['label'], record.get('file_name', 'record'))
    image, label = resize_pad_for_eval(image, label, self.image_size, image_fill=self.mean,
                                       ignore_index=self.ignore_index)
    return {'image': normalize(image, self.mean, self.std), 'label': label.astype(np.int32)}

  def padding(self) -> dict[str, np.ndarray]:
    """An all-padding example: image 0 (the normalised mean), label all ``ignore_index``."""
    height, width = self.image_size
    return {'image': np.zeros((height, width, 3), np.float32),
            'label': np.full((height, width), self.ignore_index, np.int32)}
