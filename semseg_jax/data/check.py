r"""Sanity report on a prepared dataset split: sizes, class frequencies, bad labels.

Usage::

  python -m semseg_jax.data.check --dataset=ade20k --split=validation \
      [--data_dir=~/tensorflow_datasets] [--plot=ade20k_val.png] [--limit=500]

It reads every record of the split through :func:`semseg_jax.data.get_source`
(the same path training takes) and prints

* the number of images and the range of their heights and widths;
* a table of per-class pixel counts, their share of the labelled pixels and
  the number of images each class appears in (what median-frequency class
  weights are computed from), plus the ignore (255) pixel count;
* every file whose label holds values that are neither a class id
  (``0..K-1``) nor the ignore index, with those values.

``--plot`` also draws the frequencies as a horizontal bar chart PNG (PIL only).
The exit status is 1 when any file holds out-of-range values, so the tool can
guard a data pipeline in a script.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import semseg_jax.data as data_lib


@dataclasses.dataclass
class SplitReport:
  """What :func:`check_split` found.

  Attributes:
    dataset: registry name.
    split: the split string read.
    class_names: K class names, in id order.
    palette: uint8 ``[K, 3]`` class colours.
    ignore_index: the label value that means "no label" (255).
    num_images: records read.
    min_size: smallest (height, width) seen, pixels, per axis; (0, 0) if empty.
    max_size: largest (height, width) seen, pixels, per axis.
    pixels: int64 ``[K]`` pixels per class.
    images_with: int64 ``[K]`` images in which each class occurs.
    ignore_pixels: pixels equal to ``ignore_index``.
    bad_files: ``(file_name, sorted out-of-range values)`` per offending record.
  """
  dataset: str
  split: str
  class_names: tuple[str, ...]
  palette: np.ndarray
  ignore_index: int
  pixels: np.ndarray
  images_with: np.ndarray
  num_images: int = 0
  min_size: tuple[int, int] = (0, 0)
  max_size: tuple[int, int] = (0, 0)
  ignore_pixels: int = 0
  bad_files: list[tuple[str, list[int]]] = dataclasses.field(default_factory=list)

  @property
  def labelled_pixels(self) -> int:
    return int(self.pixels.sum())

  @property
  def frequencies(self) -> np.ndarray:
    """float64 ``[K]``: each class's share of the labelled (non-ignore) pixels."""
    total = self.labelled_pixels
    return self.pixels / total if total else np.zeros(len(self.pixels))


def _text(value: Any) -> str:
  return value.decode('utf-8', 'replace') if isinstance(value, bytes) else str(value)


def _read_label(record: Any, i: int) -> tuple[np.ndarray, str]:
  """The record's integer ``[H, W]`` label and its file name; BadInputError if malformed."""
  name = f'record {i}'
  if hasattr(record, 'get') and record.get('file_name') is not None:
    name = _text(record['file_name'])
  if not hasattr(record, 'get') or record.get('label') is None:
    raise data_lib.BadInputError(f'{name}: record has no label (keys: '
                                 f'{sorted(record) if hasattr(record, "keys") else "none"})')
  try:
    label = np.asarray(record['label'])
  except (TypeError, ValueError) as e:
    raise data_lib.BadInputError(f'{name}: label is not an array ({e})') from None
  if label.ndim == 3 and label.shape[-1] == 1:
    label = label[..., 0]
  if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
    raise data_lib.BadInputError(f'{name}: label has shape {label.shape} and dtype '
                                 f'{label.dtype}, expected integer [H, W] or [H, W, 1]')
  return label, name


def check_source(source: Sequence[Any], info: data_lib.DatasetInfo, split: str,
                 limit: int | None = None) -> SplitReport:
  """Scans the records of ``source`` (``len``/``[i]`` -> ``{image, label, file_name}``).

  Args:
    source: a random-access source as returned by ``get_source``.
    info: the dataset's metadata (K, names, palette, ignore index).
    split: the split name, for the report only.
    limit: read only the first ``limit`` records (None = all).

  Raises:
    data.BadInputError: a record has no label, or one that is not an integer
      ``[H, W]`` (or ``[H, W, 1]``) array; the message names its file.
  """
  k = info.num_classes
  report = SplitReport(info.name, split, info.class_names, info.palette, info.ignore_index,
                       pixels=np.zeros(k, np.int64), images_with=np.zeros(k, np.int64))
  n = len(source) if limit is None else min(limit, len(source))
  lo, hi = [math.inf, math.inf], [0, 0]
  for i in range(n):
    label, name = _read_label(source[i], i)
    h, w = label.shape
    lo, hi = [min(lo[0], h), min(lo[1], w)], [max(hi[0], h), max(hi[1], w)]
    values = label.reshape(-1).astype(np.int64)
    negative = np.unique(values[values < 0]).tolist() if values.min(initial=0) < 0 else []
    # Every value's pixel count in one pass (ids above 255 too, for wide dtypes).
    counts = np.bincount(values[values >= 0], minlength=max(256, info.ignore_index + 1))
    report.pixels += counts[:k]
    report.images_with += counts[:k] > 0
    report.ignore_pixels += int(counts[info.ignore_index])
    bad = negative + [v for v in np.flatnonzero(counts).tolist()
                      if v >= k and v != info.ignore_index]
    if bad:
      report.bad_files.append((name, bad))
  report.num_images = n
  if n:
    report.min_size, report.max_size = (int(lo[0]), int(lo[1])), (hi[0], hi[1])
  return report


def check_split(dataset: str, split: str, data_dir: str | None = None,
                limit: int | None = None) -> SplitReport:
  """Reads ``split`` of the registered, prepared ``dataset`` and scans it.

  Raises:
    DatasetNotFoundError: the dataset is unknown or not prepared in ``data_dir``.
  """
  info = data_lib.get_dataset_info(dataset, data_dir)
  source = data_lib.get_source({'name': dataset, 'data_dir': data_dir}, split,
                               data_dir=data_dir)
  return check_source(source, info, split, limit)


def format_report(report: SplitReport) -> str:
  """The human-readable report: summary lines, class table, bad files."""
  lines = [f'dataset {report.dataset!r} split {report.split!r}: {report.num_images} images, '
           f'height {report.min_size[0]}..{report.max_size[0]}, '
           f'width {report.min_size[1]}..{report.max_size[1]} px']
  total = report.labelled_pixels + report.ignore_pixels
  ignore_share = report.ignore_pixels / total if total else 0.0
  lines.append(f'labelled pixels {report.labelled_pixels}, ignore ({report.ignore_index}) '
               f'pixels {report.ignore_pixels} ({100 * ignore_share:.2f}% of all)')
  width = max([len('class')] + [len(n) for n in report.class_names])
  lines.append(f'{"id":>4}  {"class":<{width}}  {"pixels":>14}  {"share %":>8}  {"images":>7}')
  for i, (name, freq) in enumerate(zip(report.class_names, report.frequencies)):
    lines.append(f'{i:>4}  {name:<{width}}  {report.pixels[i]:>14}  {100 * freq:>8.3f}  '
                 f'{report.images_with[i]:>7}')
  if report.bad_files:
    lines.append(f'{len(report.bad_files)} file(s) hold label values that are neither a class '
                 f'(0..{len(report.class_names) - 1}) nor {report.ignore_index}:')
    lines.extend(f'  {name}: {values}' for name, values in report.bad_files)
  else:
    lines.append(f'no label values outside 0..{len(report.class_names) - 1} and '
                 f'{report.ignore_index}')
  return '\n'.join(lines)


def plot_frequencies(report: SplitReport, path: str, *, bar_width: int = 400,
                     row_height: int = 14) -> tuple[int, int]:
  """Writes a horizontal bar chart of class pixel shares to the PNG ``path``.

  One row per class: name, a bar in the class colour whose length is its share
  relative to the most frequent class, and the share in percent.

  Returns:
    The image size (width, height) in pixels.
  """
  font = ImageFont.load_default()
  names = report.class_names
  name_px = max(int(font.getlength(f'{len(names) - 1:>3} {n}')) for n in names) + 8
  margin, title_h = 8, row_height + 6
  width = margin + name_px + bar_width + 70 + margin
  height = margin + title_h + row_height * len(names) + margin
  canvas = Image.new('RGB', (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  draw.text((margin, margin), f'{report.dataset} / {report.split}: share of labelled pixels '
            f'({report.num_images} images)', fill=(0, 0, 0), font=font)
  freqs = report.frequencies
  top = float(freqs.max()) if freqs.size and freqs.max() > 0 else 1.0
  for i, (name, freq) in enumerate(zip(names, freqs)):
    y = margin + title_h + i * row_height
    draw.text((margin, y), f'{i:>3} {name}', fill=(0, 0, 0), font=font)
    x0 = margin + name_px
    length = int(round(bar_width * float(freq) / top))
    colour = tuple(int(c) for c in report.palette[i])
    if length:
      # A grey outline keeps white / very light class colours visible.
      draw.rectangle([x0, y + 2, x0 + length, y + row_height - 3], fill=colour,
                     outline=(128, 128, 128))
    draw.text((x0 + length + 4, y), f'{100 * freq:.2f}%', fill=(0, 0, 0), font=font)
  canvas.save(path, format='PNG')
  return width, height


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status (1 if bad labels were found)."""
  import argparse  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(
      prog='python -m semseg_jax.data.check',
      description='Image count, size range, class pixel frequencies and out-of-range label '
                  'values of a prepared dataset split.')
  parser.add_argument('--dataset', required=True, help='registered dataset name, e.g. ade20k')
  parser.add_argument('--split', required=True, help="split, e.g. 'train', 'validation[:10%%]'")
  parser.add_argument('--data_dir', default=None, help='TFDS data_dir (default: TFDS default)')
  parser.add_argument('--plot', default=None, help='write a bar chart of frequencies (PNG)')
  parser.add_argument('--limit', type=int, default=None, help='read only the first N images')
  args = parser.parse_args(argv)
  if args.plot is not None and not args.plot.lower().endswith('.png'):
    parser.error(f'--plot={args.plot}: the chart is written as PNG; give a .png file name')
  try:
    report = check_split(args.dataset, args.split, args.data_dir, args.limit)
  except (data_lib.DatasetNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(format_report(report))
  if args.plot:
    size = plot_frequencies(report, args.plot)
    print(f'wrote {args.plot} ({size[0]}x{size[1]} px)')
  return 1 if report.bad_files else 0


if __name__ == '__main__':
  sys.exit(main())
