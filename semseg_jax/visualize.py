"""Drawing label maps: colour palettes, overlays and side-by-side panels."""
from __future__ import annotations

import numpy as np
from PIL import Image

IGNORE_COLOR = (255, 255, 255)


def colorize(label_map: np.ndarray, palette: np.ndarray) -> np.ndarray:
  """``[H, W]`` class ids -> ``[H, W, 3]`` uint8; ids outside the palette (255) are white."""
  palette = np.asarray(palette, np.uint8)
  lut = np.tile(np.asarray(IGNORE_COLOR, np.uint8), (256, 1))
  lut[:len(palette)] = palette[:256]
  return lut[np.asarray(label_map).astype(np.int64) & 0xFF]


def overlay(image: np.ndarray, label_map: np.ndarray, palette: np.ndarray,
            alpha: float = 0.5) -> np.ndarray:
  """Blends the colour-coded ``label_map`` over the uint8 ``image``."""
  colours = colorize(label_map, palette).astype(np.float32)
  mixed = (1 - alpha) * np.asarray(image, np.float32) + alpha * colours
  return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def side_by_side(image: np.ndarray, pred: np.ndarray, palette: np.ndarray,
                 label: np.ndarray | None = None, gap: int = 4) -> np.ndarray:
  """``input | prediction [| ground truth]`` as one uint8 ``[H, W', 3]`` image."""
  panels = [np.asarray(image, np.uint8), colorize(pred, palette)]
  if label is not None:
    panels.append(colorize(label, palette))
  h = panels[0].shape[0]
  spacer = np.full((h, gap, 3), 255, np.uint8)
  row = []
  for i, p in enumerate(panels):
    row += [p] if i == 0 else [spacer, p]
  return np.concatenate(row, axis=1)


def save_image(path: str, image: np.ndarray) -> None:
  """Writes a uint8 ``[H, W, 3]`` array as PNG."""
  Image.fromarray(np.asarray(image, np.uint8)).save(path)


def save_label_png(path: str, label_map: np.ndarray, palette: np.ndarray) -> None:
  """Writes class ids as a palette ('P' mode) PNG: pixel values are the ids."""
  label_map = np.ascontiguousarray(label_map, np.uint8)
  img = Image.frombytes('P', (label_map.shape[1], label_map.shape[0]), label_map.tobytes())
  lut = colorize(np.arange(256, dtype=np.uint8)[None], palette)[0]
  img.putpalette(lut.reshape(-1).tolist())
  img.save(path)
