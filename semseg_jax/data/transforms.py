"""Per-example numpy transforms for (image, label) pairs.

Images are ``[H, W, 3]`` RGB (uint8, or float32 in 0-255 units after colour
jitter); labels are ``[H, W]`` integer class ids with ``ignore_index`` (255)
for "no label". Labels are only ever moved, flipped, rotated, padded with
``ignore_index`` or resized with NEAREST, so no transform creates a class id
that was not in its input. Random transforms take an explicit
``np.random.Generator``; the grain pipeline hands each example one seeded by
(seed, epoch, example index), and a transform that is off draws nothing.

``TrainTransform`` and ``EvalTransform`` chain them as ``config.dataset``
asks (one key per transform); ``Normalization`` is the last step of both.
Geometry and the hue/gamma steps work on uint8 in C (PIL, lookup tables);
only brightness/contrast/saturation need float32.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image

IGNORE_INDEX = 255
Size = tuple[int, int]  # (H, W) in pixels.


def record_name(record: dict[str, Any], default: str = 'record') -> str:
  """The record's ``file_name`` as str (``tfds.data_source`` returns bytes)."""
  name = record.get('file_name', default)
  if isinstance(name, np.ndarray) and name.ndim == 0:
    name = name.item()
  if isinstance(name, (bytes, np.bytes_)):
    return bytes(name).decode('utf-8', 'replace')
  return str(name)


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


# --- normalisation ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Normalization:
  """``(image[..., order] - mean) / std``: RGB uint8 in, float32 network input out.

  Attributes:
    mean, std: per channel of the *network's* channel order, 0-255 units.
    bgr: the network expects BGR (converted Caffe weights); ``mean``/``std``
      are then in B, G, R order.
  """
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  bgr: bool = False

  @property
  def rgb_mean(self) -> tuple[float, float, float]:
    """The mean as an RGB pixel (0-255): padding with it normalises to ~0."""
    return tuple(self.mean[::-1]) if self.bgr else tuple(self.mean)

  def __call__(self, image: np.ndarray) -> np.ndarray:
    """RGB ``[..., 3]`` (uint8 or float 0-255) -> normalised float32, network channel order."""
    image = np.asarray(image)
    if self.bgr:
      image = image[..., ::-1]
    mean = np.asarray(self.mean, np.float32)
    inv_std = np.float32(1.0) / np.asarray(self.std, np.float32)
    out = image.astype(np.float32)  # One float copy, then in place.
    out -= mean
    out *= inv_std
    return out

  def invert(self, image: np.ndarray) -> np.ndarray:
    """Normalised ``[..., 3]`` -> RGB uint8 (for drawing)."""
    out = np.asarray(image, np.float32) * np.asarray(self.std, np.float32)
    out += np.asarray(self.mean, np.float32)
    if self.bgr:
      out = out[..., ::-1]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# The named presets of ``config.dataset.normalization``.
NORMALIZATIONS = {
    # torchvision / ImageNet: mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225) of x/255.
    'imagenet': Normalization((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
    # Caffe (PSPNet, ICNet weights): BGR, mean subtracted, no scaling.
    'caffe_bgr': Normalization((103.939, 116.779, 123.68), (1.0, 1.0, 1.0), bgr=True),
}


def normalization_preset(name: Any, what: str = 'normalization',
                         others: Sequence[str] = ()) -> Normalization:
  """The preset ``NORMALIZATIONS[name]``; else a ValueError naming ``what``
  and the valid names (the presets, then ``others``)."""
  if isinstance(name, str) and name in NORMALIZATIONS:
    return NORMALIZATIONS[name]
  raise ValueError(f'{what} must be one of {", ".join([*NORMALIZATIONS, *others])}, '
                   f'got {name!r}')


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """``(image - mean) / std`` per channel (0-255 units, same channel order); float32."""
  return Normalization(tuple(mean), tuple(std))(image)


# --- geometry -----------------------------------------------------------------------------------


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


def resize(image: np.ndarray, label: np.ndarray, size: Size) -> tuple[np.ndarray, np.ndarray]:
  """Both to ``size`` (image bilinear, label nearest); the aspect ratio may change."""
  return resize_image(image, size), resize_label(label, size)


def random_scale(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                 scale_range: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """Rescales both by one factor drawn uniformly from ``scale_range = (lo, hi)``."""
  lo, hi = scale_range
  scale = rng.uniform(lo, hi)
  h, w = label.shape
  return resize(image, label, (max(1, round(h * scale)), max(1, round(w * scale))))


def _place(array: np.ndarray, size: Size, top: int, left: int, fill: Any) -> np.ndarray:
  """``out[y, x] = array[y + top, x + left]`` on a ``size`` canvas, ``fill`` elsewhere.

  Negative ``top``/``left`` (or a canvas larger than ``array``) pad.
  """
  height, width = size
  h, w = array.shape[:2]
  if (top, left, h, w) == (0, 0, height, width):
    return array
  out = np.empty((height, width) + array.shape[2:], array.dtype)
  y0, y1 = max(0, -top), min(height, h - top)
  x0, x1 = max(0, -left), min(width, w - left)
  if y0 < y1 and x0 < x1:
    out[y0:y1, x0:x1] = array[y0 + top:y1 + top, x0 + left:x1 + left]
    # Fill only the border (a full-canvas fill would write every pixel twice).
    out[:y0], out[y1:], out[y0:y1, :x0], out[y0:y1, x1:] = fill, fill, fill, fill
  else:
    out[...] = fill
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


def random_scale_crop(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                      scale_range: Sequence[float], size: Size, *,
                      image_fill: float | Sequence[float] = 0.0,
                      ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
  """``random_scale`` then ``random_crop``, resampling only the pixels the crop keeps.

  Draws the same random numbers and gives the same label as the two steps
  (image within 1 level: PIL rounds the sub-box coefficients differently);
  at scale 2 it resamples a quarter of the image pixels.
  """
  h, w = label.shape
  scale = rng.uniform(*scale_range)
  sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
  height, width = size
  top = int(rng.integers(min(0, sh - height), max(0, sh - height) + 1))
  left = int(rng.integers(min(0, sw - width), max(0, sw - width) + 1))
  y0, y1 = max(0, top), min(sh, top + height)
  x0, x1 = max(0, left), min(sw, left + width)
  if (sh, sw) == (h, w) or y0 >= y1 or x0 >= x1:
    region = resize_image(image, (sh, sw))[y0:y1, x0:x1]
  else:
    # The window's part of the scaled image, as a box in input coordinates.
    box = (x0 * w / sw, y0 * h / sh, x1 * w / sw, y1 * h / sh)
    region = np.asarray(Image.fromarray(image).resize((x1 - x0, y1 - y0), Image.BILINEAR,
                                                      box=box))
  # Place the region where it sits in the window (padding where the image is smaller).
  # Labels are scaled whole (one cheap uint8 channel): nearest ties in a sub-box
  # could pick the other neighbour, and labels must match the unfused path exactly.
  return (_place(region, size, top - y0, left - x0, _fill_value(image, image_fill)),
          _place(resize_label(label, (sh, sw)), size, top, left, ignore_index))


def center_crop(image: np.ndarray, label: np.ndarray, size: Size, *,
                image_fill: float | Sequence[float] = 0.0,
                ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
  """The central ``size`` window (``top = (h - H) // 2``); a shorter side is padded evenly."""
  h, w = label.shape
  top, left = (h - size[0]) // 2, (w - size[1]) // 2
  return (_place(image, size, top, left, _fill_value(image, image_fill)),
          _place(label, size, top, left, ignore_index))


def translate(image: np.ndarray, label: np.ndarray, offset: tuple[int, int], *,
              image_fill: float | Sequence[float] = 0.0,
              ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
  """Shifts the content by ``offset = (dy, dx)`` pixels (down/right positive), same size.

  ``out[y, x] = in[y - dy, x - dx]``; uncovered pixels get ``image_fill`` /
  ``ignore_index``.
  """
  dy, dx = offset
  size = label.shape
  return (_place(image, size, -dy, -dx, _fill_value(image, image_fill)),
          _place(label, size, -dy, -dx, ignore_index))


def random_translate(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                     max_fraction: float, **kwargs) -> tuple[np.ndarray, np.ndarray]:
  """``translate`` by ``round(u * side)`` per axis, ``u ~ U(-max_fraction, max_fraction)``."""
  h, w = label.shape
  uy, ux = rng.uniform(-max_fraction, max_fraction, size=2)
  return translate(image, label, (round(uy * h), round(ux * w)), **kwargs)


def rotate(image: np.ndarray, label: np.ndarray, degrees: float, *,
           image_fill: float | Sequence[float] = 0.0,
           ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
  """Rotates both counter-clockwise by ``degrees`` about the centre, keeping the size.

  The image is resampled bilinearly, the label with nearest neighbour (so its
  ids are a subset of the input's plus ``ignore_index``); corners uncovered
  by the rotated content get ``image_fill`` / ``ignore_index``. A multiple of
  90 degrees on a square image equals ``np.rot90``.
  """
  if degrees == 0:
    return image, label
  fill = tuple(int(v) for v in _fill_value(image, image_fill))
  out_image = Image.fromarray(image).rotate(degrees, resample=Image.BILINEAR, fillcolor=fill)
  out_label = Image.fromarray(label).rotate(degrees, resample=Image.NEAREST,
                                            fillcolor=int(ignore_index))
  return np.asarray(out_image), np.asarray(out_label)


def random_rotate(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                  max_degrees: float, **kwargs) -> tuple[np.ndarray, np.ndarray]:
  """``rotate`` by an angle uniform in ``[-max_degrees, max_degrees]``."""
  return rotate(image, label, float(rng.uniform(-max_degrees, max_degrees)), **kwargs)


def random_flip(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, *,
                horizontal: bool = True, vertical: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Mirrors left-right and/or top-bottom, each with probability 1/2."""
  if horizontal and rng.random() < 0.5:
    image, label = image[:, ::-1], label[:, ::-1]
  if vertical and rng.random() < 0.5:
    image, label = image[::-1], label[::-1]
  return image, label


# --- colour -------------------------------------------------------------------------------------


def adjust_hue(image: np.ndarray, shift: float) -> np.ndarray:
  """Rotates the hue of a uint8 RGB image by ``shift`` turns (``shift`` in [-0.5, 0.5]).

  Through PIL's uint8 HSV (as torchvision's ``adjust_hue`` on PIL images), so
  the hue is quantised to 1/256 turn; ``shift == 0`` returns the input.
  """
  if shift == 0:
    return image
  hsv = np.array(Image.fromarray(image).convert('HSV'))
  hsv[..., 0] += np.uint8(round(shift * 255) % 256)  # uint8 wraps around the hue circle.
  return np.asarray(Image.fromarray(hsv, 'HSV').convert('RGB'))


def adjust_gamma(image: np.ndarray, gamma: float) -> np.ndarray:
  """``255 * (image / 255) ** gamma`` on uint8 via a 256-entry table (rounded)."""
  if gamma == 1:
    return image
  table = np.rint(255.0 * (np.arange(256) / 255.0) ** gamma).astype(np.uint8)
  return table[image]


def color_jitter(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
  """Random brightness, contrast and saturation, each by a factor in ``1 +- strength``.

  Applied in that order, clipping to 0..255 after each (as torchvision does).

  Returns:
    float32 ``[H, W, 3]`` in 0..255 (uint8 input returned unchanged when ``strength <= 0``).
  """
  if strength <= 0:
    return image
  out = np.asarray(image, np.float32)
  b, c, s = rng.uniform(1 - strength, 1 + strength, size=3).astype(np.float32)
  out = np.clip(out * b, 0, 255)
  gray = out @ np.asarray([0.299, 0.587, 0.114], np.float32)  # [H, W], ITU-R 601 luma.
  out = np.clip((out - gray.mean()) * c + gray.mean(), 0, 255)
  gray = out @ np.asarray([0.299, 0.587, 0.114], np.float32)
  return np.clip((out - gray[..., None]) * s + gray[..., None], 0, 255)


# --- evaluation padding -------------------------------------------------------------------------


def pad_for_eval(image: np.ndarray, label: np.ndarray, size: Size, *,
                 image_fill: float | Sequence[float] = 0.0, ignore_index: int = IGNORE_INDEX,
                 shrink_to_fit: bool = False, where: str = 'record'
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Pads an example at the bottom/right to ``size``, keeping its resolution.

  Returns ``(image, label, valid)``: padding has ``image_fill`` and label
  ``ignore_index``; ``valid`` (bool ``[H, W]``) is True on the real pixels.

  Raises:
    ValueError: the example is larger than ``size`` (naming ``where`` and both
      sizes), unless ``shrink_to_fit``: then it is first shrunk, keeping its
      aspect ratio, until it fits (image bilinear, label nearest).
  """
  h, w = label.shape
  height, width = size
  if h > height or w > width:
    if not shrink_to_fit:
      raise ValueError(
          f'{where}: image of {h}x{w} does not fit the eval pad size {height}x{width}; set '
          f'dataset.eval_pad_size to at least ({_round_up(max(h, height), 32)}, '
          f'{_round_up(max(w, width), 32)}) or dataset.eval_shrink_to_fit=True')
    scale = min(height / h, width / w)
    fitted = (min(height, max(1, round(h * scale))), min(width, max(1, round(w * scale))))
    image, label = resize(image, label, fitted)
  valid = np.zeros(size, bool)
  valid[:label.shape[0], :label.shape[1]] = True
  return (_place(image, size, 0, 0, _fill_value(image, image_fill)),
          _place(label, size, 0, 0, ignore_index), valid)


def resize_pad_for_eval(image: np.ndarray, label: np.ndarray, size: Size, *,
                        image_fill: float | Sequence[float] = 0.0,
                        ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
  """``pad_for_eval`` with ``shrink_to_fit=True``, without the mask."""
  image, label, _ = pad_for_eval(image, label, size, image_fill=image_fill,
                                 ignore_index=ignore_index, shrink_to_fit=True)
  return image, label


def _round_up(x: int, multiple: int) -> int:
  return int(math.ceil(x / multiple) * multiple)


# --- chains -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """Training augmentation, one config key per step, in this order.

  resize -> centre crop -> random scale -> rotate -> translate -> random crop
  to ``image_size`` -> flips -> hue -> gamma -> brightness/contrast/saturation
  -> normalise. A step whose option is None/0/False is skipped and draws no
  random numbers. Padding (crop, rotate, translate) fills the image with the
  normalisation mean (so ~0 after normalising) and the label with
  ``ignore_index``.

  Called as ``transform(record, rng)`` (grain ``random_map``); returns
  ``{'image': float32 [H, W, 3] normalised, 'label': int32 [H, W]}`` with
  ``(H, W) = image_size``.
  """
  image_size: Size
  normalization: Normalization = NORMALIZATIONS['imagenet']
  resize: Size | None = None  # Fixed (H, W) for every image first (aspect may change).
  center_crop: Size | None = None  # Central (H, W) window after `resize`.
  scale_range: tuple[float, float] | None = None
  rotate: float = 0.0  # Max |angle| in degrees.
  translate: float = 0.0  # Max shift as a fraction of each side.
  hflip: bool = False
  vflip: bool = False
  hue: float = 0.0  # Max |hue shift| in turns (<= 0.5).
  gamma: tuple[float, float] | None = None  # Gamma drawn uniformly from (lo, hi).
  color_jitter: float = 0.0  # Brightness/contrast/saturation strength.
  ignore_index: int = IGNORE_INDEX

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    image, label = check_pair(record['image'], record['label'], record_name(record))
    fill = self.normalization.rgb_mean
    pad = dict(image_fill=fill, ignore_index=self.ignore_index)
    if self.resize is not None:
      image, label = resize(image, label, self.resize)
    if self.center_crop is not None:
      image, label = center_crop(image, label, self.center_crop, **pad)
    if self.scale_range is not None and not (self.rotate or self.translate):
      # Fused: resample only the crop (2-4x less work than scaling the whole image).
      image, label = random_scale_crop(image, label, rng, self.scale_range, self.image_size,
                                       **pad)
    else:
      if self.scale_range is not None:
        image, label = random_scale(image, label, rng, self.scale_range)
      if self.rotate:
        image, label = random_rotate(image, label, rng, self.rotate, **pad)
      if self.translate:
        image, label = random_translate(image, label, rng, self.translate, **pad)
      image, label = random_crop(image, label, rng, self.image_size, **pad)
    image, label = random_flip(image, label, rng, horizontal=self.hflip, vertical=self.vflip)
    if self.hue:
      image = adjust_hue(np.ascontiguousarray(image), float(rng.uniform(-self.hue, self.hue)))
    if self.gamma is not None:
      image = adjust_gamma(image, float(rng.uniform(*self.gamma)))
    image = color_jitter(image, rng, self.color_jitter)
    return {'image': self.normalization(image), 'label': label.astype(np.int32)}


@dataclasses.dataclass(frozen=True)
class EvalTransform:
  """Evaluation preprocessing: optional ``resize``, ``pad_for_eval`` to ``pad_size``, normalise.

  Returns ``{'image': float32 [H, W, 3], 'label': int32 [H, W], 'valid': bool
  [H, W]}`` with ``(H, W) = pad_size``; the image keeps its resolution.
  """
  pad_size: Size
  normalization: Normalization = NORMALIZATIONS['imagenet']
  resize: Size | None = None
  shrink_to_fit: bool = False
  ignore_index: int = IGNORE_INDEX

  def __call__(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    name = record_name(record)
    image, label = check_pair(record['image'], record['label'], name)
    if self.resize is not None:
      image, label = resize(image, label, self.resize)
    image, label, valid = pad_for_eval(
        image, label, self.pad_size, image_fill=self.normalization.rgb_mean,
        ignore_index=self.ignore_index, shrink_to_fit=self.shrink_to_fit, where=name)
    return {'image': self.normalization(image), 'label': label.astype(np.int32), 'valid': valid}

  def padding(self) -> dict[str, np.ndarray]:
    """An all-padding example: image 0 (the normalised mean), label ``ignore_index``, invalid."""
    height, width = self.pad_size
    return {'image': np.zeros((height, width, 3), np.float32),
            'label': np.full((height, width), self.ignore_index, np.int32),
            'valid': np.zeros((height, width), bool)}
