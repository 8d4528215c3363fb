"""``shapes``: the built-in procedural segmentation dataset (no download).

Each example is an RGB image with 2-4 possibly overlapping shapes (disc,
rectangle, triangle, ring, cross; one class each, background = 0) of random
size, position, rotation and shaded colour on a textured, noisy background
(colour gradient + stripes + smooth blotches + pixel noise), and its per-pixel
class map. Each shape class draws its hue from its own range, but the ranges
overlap their neighbours' and background colours are uniform over RGB, so
colour alone does not tell the class (a per-pixel colour classifier scores
~0.2 mIoU): a model has to look at the shape around a pixel (a ring's hole
shows what lies beneath it). A thin band along every visible shape border,
where anti-aliased pixels mix two classes, is labelled 255 (ignore).

Example ``i`` of a split is a pure function of ``(seed, split, i, image_size)``:
its random numbers come from a PCG64 generator keyed by that tuple through
``np.random.SeedSequence``, and only ``Generator.random`` (uniform floats, whose
stream numpy keeps stable) is drawn. The arithmetic is float32 numpy, so a CPU
with other SIMD transcendental functions may round an occasional pixel one grey
level differently; labels are thresholds far from such noise. Bump
``_VERSION`` when a change alters the pixels.
"""
from __future__ import annotations

import colorsys
import math
from typing import Any

import numpy as np

CLASS_NAMES = ('background', 'disc', 'rectangle', 'triangle', 'ring', 'cross')
NUM_CLASSES = len(CLASS_NAMES)
# Colours for drawing label maps (not the colours of the shapes in the images).
PALETTE = np.array(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
     [245, 130, 48]], np.uint8)
IGNORE_INDEX = 255
SPLITS = ('train', 'validation', 'test')

_VERSION = 1  # Part of every example's seed.
# Half-width (pixels) of the ignore band around a border: the anti-aliasing ramp
# is 1 px wide, so +-0.75 px covers every mixed pixel.
_BAND = 0.75
_MIN_SHAPES, _MAX_SHAPES = 2, 4
# Shape size ("radius") as a fraction of min(H, W).
_MIN_RADIUS, _MAX_RADIUS = 0.15, 0.3
# A shape's colour must differ from the background under its centre by at least
# this much (sum of absolute channel differences, 0-255 units) so it stands
# out; else it is redrawn.
_MIN_CONTRAST = 150.0
# Half-width of each class's hue range (hues are in [0, 1); centres 0.2 apart).
_HUE_SPREAD = 0.12
# Every shape lies within this many radii of its centre (a rectangle's corner
# reaches sqrt(1 + 0.9**2) = 1.35).
_EXTENT = 1.4


class _Uniform:
  """Uniform draws from ``Generator.random`` only (stable across numpy versions)."""

  def __init__(self, rng: np.random.Generator):
    self._rng = rng

  def __call__(self, lo: float = 0.0, hi: float = 1.0, size=None):
    return lo + (hi - lo) * self._rng.random(size)

  def field(self, shape: tuple[int, ...], lo: float, hi: float) -> np.ndarray:
    """A float32 array of independent uniform draws."""
    return lo + (hi - lo) * self._rng.random(shape, dtype=np.float32)

  def integer(self, lo: int, hi: int) -> int:
    """An integer in ``[lo, hi]`` (inclusive)."""
    return min(hi, lo + int(self._rng.random() * (hi - lo + 1)))


def _interp_matrix(size: int, cells: int) -> np.ndarray:
  """``[size, cells]`` weights of linear interpolation from a coarse grid."""
  pos = np.linspace(0.0, cells - 1.0, size, dtype=np.float32)
  lo = np.minimum(pos.astype(np.int64), cells - 2)
  frac = pos - lo
  weights = np.zeros((size, cells), np.float32)
  weights[np.arange(size), lo] = 1 - frac
  weights[np.arange(size), lo + 1] = frac
  return weights


def _upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear upsampling of a coarse ``[h, w, C]`` grid to ``[height, width, C]``."""
  gh, gw, channels = grid.shape
  # Separable: two small matrix products instead of gathers over the full image.
  rows = (_interp_matrix(height, gh) @ grid.reshape(gh, gw * channels)).reshape(height, gw, channels)
  return np.matmul(_interp_matrix(width, gw)[None], rows)


def _background(u: _Uniform, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
  """A gradient plus stripes plus smooth blotches; float32 ``[H, W, 3]`` in ~0..255."""
  height, width = yy.shape[0], xx.shape[1]
  size = float(max(height, width))
  # Linear gradient between two random colours along a random direction.
  angle = u(0, 2 * math.pi)
  t = (xx * math.cos(angle) + yy * math.sin(angle)) / size
  t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
  c0, c1 = u(0, 255, 3).astype(np.float32), u(0, 255, 3).astype(np.float32)
  image = c0 + (c1 - c0) * t[..., None]
  # Sinusoidal stripes of random period, direction, phase and colour.
  angle = u(0, 2 * math.pi)
  period = u(0.05, 0.3) * size
  phase = u(0, 2 * math.pi)
  stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / period) + phase)
  image += stripes[..., None] * u(-15, 15, 3).astype(np.float32)
  # Smooth random blotches: a coarse noise grid upsampled bilinearly.
  cells = u.integer(3, 8)
  blotches = u.field((cells, cells, 3), -1.0, 1.0) * np.float32(u(0, 20))
  image += _upsample(blotches, height, width)
  return image


def _shape_colour(u: _Uniform, cls: int) -> np.ndarray:
  """A random RGB colour (float32 [3], 0-255) for a shape of class ``cls``.

  Each class has its own hue centre, evenly spaced around the colour wheel,
  but hues spread +-_HUE_SPREAD around it, so neighbouring classes overlap and
  every hue is shared by at least two classes (and by the backgrounds, whose
  colours are uniform over RGB).
  """
  hue = (cls - 1) / (NUM_CLASSES - 1) + u(-_HUE_SPREAD, _HUE_SPREAD)
  rgb = colorsys.hsv_to_rgb(hue % 1.0, u(0.5, 1.0), u(0.5, 1.0))
  return np.asarray(rgb, np.float32) * 255


def _sdf_box(px: np.ndarray, py: np.ndarray, half_x: float, half_y: float) -> np.ndarray:
  """Signed distance to an axis-aligned box centred at 0 (negative inside)."""
  qx = np.abs(px) - half_x
  qy = np.abs(py) - half_y
  outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
  return outside + np.minimum(np.maximum(qx, qy), 0)


def _shape_sdf(cls: int, u: _Uniform, dx: np.ndarray, dy: np.ndarray,
               radius: float) -> np.ndarray:
  """Signed distance (pixels, negative inside) of a random shape of class ``cls``.

  ``dx``/``dy`` are pixel offsets from the shape's centre, broadcasting to
  ``[H, W]``.
  """
  name = CLASS_NAMES[cls]
  if name == 'disc':
    return np.hypot(dx, dy) - radius
  if name == 'ring':
    inner = radius * u(0.3, 0.55)
    return np.abs(np.hypot(dx, dy) - 0.5 * (radius + inner)) - 0.5 * (radius - inner)
  angle = u(0, math.pi)
  cos, sin = math.cos(angle), math.sin(angle)
  px, py = dx * cos + dy * sin, dy * cos - dx * sin  # Rotated into the shape's frame.
  if name == 'rectangle':
    return _sdf_box(px, py, radius * u(0.6, 1.0), radius * u(0.35, 0.9))
  if name == 'cross':
    half_width = radius * u(0.2, 0.32)
    return np.minimum(_sdf_box(px, py, radius, half_width), _sdf_box(px, py, half_width, radius))
  if name == 'triangle':
    # Three vertices 1-1.25 radii from the centre (so a triangle's area is not
    # far below a disc's), roughly 120 degrees apart so it is never degenerate;
    # counter-clockwise, so each edge's outward normal is (ey, -ex) / |e|. The
    # max of the three edge-line distances is the exact SDF inside and a slight
    # underestimate beyond the corners.
    angles = [angle + k * 2 * math.pi / 3 + u(-0.35, 0.35) for k in range(3)]
    reach = [radius * u(1.0, 1.25) for _ in angles]
    vx = [r * math.cos(a) for r, a in zip(reach, angles)]
    vy = [r * math.sin(a) for r, a in zip(reach, angles)]
    sdf = None
    for k in range(3):
      ex, ey = vx[(k + 1) % 3] - vx[k], vy[(k + 1) % 3] - vy[k]
      norm = math.hypot(ex, ey)
      d = ((dx - vx[k]) * ey - (dy - vy[k]) * ex) / norm
      sdf = d if sdf is None else np.maximum(sdf, d)
    return sdf
  raise AssertionError(name)


def generate_example(seed: int, split: str, index: int,
                     image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """Draws example ``index`` of ``split``.

  Returns:
    ``(image, label)``: uint8 ``[H, W, 3]`` and uint8 ``[H, W]`` with class ids
    ``0..NUM_CLASSES-1`` and ``IGNORE_INDEX`` on shape borders.
  """
  height, width = image_size
  key = [_VERSION, seed, SPLITS.index(split), index, height, width]
  u = _Uniform(np.random.Generator(np.random.PCG64(np.random.SeedSequence(key))))
  yy = np.arange(height, dtype=np.float32)[:, None] + 0.5  # Pixel centres.
  xx = np.arange(width, dtype=np.float32)[None, :] + 0.5
  image = _background(u, yy, xx)
  label = np.zeros((height, width), np.uint8)
  ambiguous = np.zeros((height, width), bool)
  short = float(min(height, width))
  for _ in range(u.integer(_MIN_SHAPES, _MAX_SHAPES)):
    cls = u.integer(1, NUM_CLASSES - 1)
    radius = short * u(_MIN_RADIUS, _MAX_RADIUS)
    # Centres lie inside the frame; big shapes near it still get cut by its border.
    cy, cx = u(0.05, 0.95) * height, u(0.05, 0.95) * width
    under = image[int(cy), int(cx)]
    for _ in range(16):
      colour = _shape_colour(u, cls)
      if np.abs(colour - under).sum() >= _MIN_CONTRAST:
        break
    shade_angle = u(0, 2 * math.pi)
    shade = u(-25, 25, 3).astype(np.float32)
    # Work on the shape's bounding window only (every shape lies within
    # _EXTENT * radius of its centre), plus a margin for the border band.
    reach = _EXTENT * radius + 2
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, height)
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, width)
    dy, dx = yy[y0:y1] - np.float32(cy), xx[:, x0:x1] - np.float32(cx)
    sdf = _shape_sdf(cls, u, dx, dy, radius)  # Draws the shape's own parameters.
    window = (slice(y0, y1), slice(x0, x1))
    # Shading across the shape, so its fill is not one flat colour either.
    ramp = (dx * math.cos(shade_angle) + dy * math.sin(shade_angle)) / radius
    fill = colour + ramp[..., None] * shade
    # Coverage of a pixel by the shape: a 1 px anti-aliasing ramp at the border.
    alpha = np.clip(0.5 - sdf, 0.0, 1.0)[..., None]
    image[window] += (fill - image[window]) * alpha
    label[window][sdf < 0] = cls
    # A border of this shape is ambiguous; ambiguous pixels it covers no longer are.
    ambiguous[window] = (ambiguous[window] & (sdf > -_BAND)) | (np.abs(sdf) < _BAND)
  image += u.field((height, width, 3), -1.0, 1.0) * np.float32(u(2, 8))  # Pixel noise.
  label[ambiguous] = IGNORE_INDEX
  return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


class ShapesSource:
  """A grain ``RandomAccessDataSource`` of ``shapes`` examples.

  ``source[i]`` is ``{'image': uint8 [H, W, 3], 'label': uint8 [H, W],
  'file_name': str}``, generated on demand (about 1.5 ms at 128x128 on one core).
  """

  def __init__(self, split: str = 'train', num_examples: int = 1000,
               image_size: tuple[int, int] = (128, 128), seed: int = 0):
    if split not in SPLITS:
      raise ValueError(f'shapes: unknown split {split!r}; expected one of {SPLITS}')
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples <= 0:
      raise ValueError(f'shapes: num_examples must be a positive int, got {num_examples!r}')
    size = tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and s >= 8 for s in size):
      raise ValueError(f'shapes: image_size must be (H, W) with ints >= 8, got {image_size!r}')
    self.split = split
    self.num_examples = num_examples
    self.image_size: tuple[int, int] = size  # type: ignore[assignment]
    self.seed = int(seed)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f'shapes {self.split}: index {index} out of range '
                       f'[0, {self.num_examples})')
    image, label = generate_example(self.seed, self.split, index, self.image_size)
    return {'image': image, 'label': label, 'file_name': f'shapes/{self.split}/{index:06d}'}

  def __repr__(self) -> str:
    return (f'ShapesSource(split={self.split!r}, num_examples={self.num_examples}, '
            f'image_size={self.image_size}, seed={self.seed})')
