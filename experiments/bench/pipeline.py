"""Training input pipeline throughput on VOC-sized JPEGs (decode + augment + batch).

    python experiments/bench/pipeline.py [--num_images=200] [--workers=0,2] [--batches=12]

Writes ``--num_images`` generated 500x375 JPEG photos (smooth colour fields
with shapes, quality 90, like VOC's) and palette-PNG labels in the real
VOCdevkit layout, prepares them with the ``voc2012`` TFDS builder
(ArrayRecord; reused from ``--data_dir`` when already there), then reads the
``train`` split through ``pipeline.make_train_iterator`` with the VOC preset:
512x512 crops, random scale 0.5-2, horizontal flip, ImageNet normalisation.
Reported: wall-clock images/s over ``--batches`` batches after one warm-up
batch (which includes worker start-up), per worker count; the CPU time per
image of the in-process run; and a single-process split of the per-image CPU
cost (record read + JPEG/PNG decode vs. augmentation). On a shared machine
the wall numbers fall with the load (printed as load1), the CPU numbers much
less: ``1000 / CPU ms`` is the rate one idle core sustains.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# pylint: disable=g-import-not-at-top,wrong-import-position (after the sys.path line)
from configs import datasets
from configs import default
from semseg_jax import data
from semseg_jax.data import pipeline
from semseg_jax.data.builders import base
# pylint: enable=g-import-not-at-top,wrong-import-position

H, W = 375, 500  # VOC's most common size (landscape).


def _photo(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """A smooth, JPEG-friendly colour image and a matching label with a void border."""
  y, x = np.mgrid[0:H, 0:W].astype(np.float32)
  base_rgb = rng.uniform(40, 200, 3)
  grad = rng.uniform(-0.2, 0.2, (2, 3))
  image = base_rgb + y[..., None] * grad[0] + x[..., None] * grad[1]
  image += rng.normal(0, 6, (H, W, 3))  # Sensor-like noise so JPEG is not trivially small.
  pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
  label = Image.new('L', (W, H), 0)
  draw_i, draw_l = ImageDraw.Draw(pil), ImageDraw.Draw(label)
  for _ in range(rng.integers(2, 6)):
    x0, y0 = rng.integers(0, W - 60), rng.integers(0, H - 60)
    box = (int(x0), int(y0), int(x0 + rng.integers(40, 200)), int(y0 + rng.integers(40, 200)))
    cls = int(rng.integers(1, 21))
    draw_i.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw_l.ellipse(box, fill=cls, outline=255, width=3)  # VOC's void outline.
  return np.asarray(pil), np.asarray(label)


def write_voc_tree(root: str, num_images: int) -> None:
  voc = os.path.join(root, 'VOCdevkit', 'VOC2012')
  for sub in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'):
    os.makedirs(os.path.join(voc, sub), exist_ok=True)
  rng = np.random.default_rng(0)
  ids = [f'2007_{i:06d}' for i in range(num_images)]
  palette = base.voc_colormap().reshape(-1).tolist()
  for i in ids:
    image, label = _photo(rng)
    Image.fromarray(image).save(os.path.join(voc, 'JPEGImages', f'{i}.jpg'), quality=90)
    png = Image.fromarray(label, mode='P')
    png.putpalette(palette)
    png.save(os.path.join(voc, 'SegmentationClass', f'{i}.png'))
  sets = os.path.join(voc, 'ImageSets', 'Segmentation')
  with open(os.path.join(sets, 'train.txt'), 'w') as f:
    f.write('\n'.join(ids) + '\n')
  with open(os.path.join(sets, 'val.txt'), 'w') as f:
    f.write('\n'.join(ids[:4]) + '\n')


def prepare(data_dir: str, num_images: int) -> None:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from semseg_jax.data.builders import voc  # pylint: disable=g-import-not-at-top
  builder = voc.Voc2012(data_dir=data_dir, sbd=False)
  if builder.is_prepared():
    return
  raw = os.path.join(data_dir, 'raw')
  t0 = time.perf_counter()
  write_voc_tree(raw, num_images)
  builder.download_and_prepare(
      download_dir=os.path.join(data_dir, 'dl'),
      download_config=tfds.download.DownloadConfig(manual_dir=raw))
  print(f'prepared {num_images} images in {time.perf_counter() - t0:.0f} s at {data_dir}')


def dataset_config(workers: int, batch_size: int):
  config = datasets.voc(default.get_config(), crop=(512, 512))
  config.dataset.train_split = 'train'
  config.dataset.scale_range = (0.5, 2.0)
  config.dataset.hflip = True
  config.dataset.num_workers = workers
  config.dataset.prefetch = 2
  return config.dataset


def throughput(source, workers: int, batch_size: int, batches: int) -> tuple[float, float]:
  """(images/s wall clock, CPU ms per image of this process: all of it when workers=0)."""
  cfg = dataset_config(workers, batch_size)
  it = pipeline.make_train_iterator(source, cfg, seed=0, batch_size=batch_size)
  try:
    next(it)  # Warm-up: worker start-up and the first fill of the buffers.
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
      batch = next(it)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
  finally:
    if hasattr(it, 'close'):
      it.close()
  assert batch['image'].shape == (batch_size, 512, 512, 3)
  return batches * batch_size / elapsed, cpu / (batches * batch_size) * 1e3


def split_costs(source, n: int = 32) -> tuple[float, float]:
  """Single-process CPU ms per image: (record read + decode, augment + normalise).

  CPU time, not wall time, so a shared machine's load inflates it less.
  """
  t0 = time.process_time()
  records = [source[i % len(source)] for i in range(n)]
  read = (time.process_time() - t0) / n * 1e3
  transform = pipeline.train_transform(dataset_config(0, 1))
  t0 = time.process_time()
  for i, record in enumerate(records):
    transform(record, np.random.default_rng(i))
  return read, (time.process_time() - t0) / n * 1e3


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num_images', type=int, default=200)
  parser.add_argument('--data_dir', default=None, help='Reused if prepared; default: a temp dir.')
  parser.add_argument('--workers', default='0,2')
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--batches', type=int, default=12)
  args = parser.parse_args()
  data_dir = args.data_dir or tempfile.mkdtemp(prefix='semseg_bench_')
  prepare(data_dir, args.num_images)
  cfg = dataset_config(0, args.batch_size)
  source = data.get_source(cfg, 'train', data_dir=data_dir)
  load = os.getloadavg()[0]
  read_ms, aug_ms = split_costs(source)
  print(f'cpus={os.cpu_count()} load1={load:.1f} images={len(source)} {H}x{W} JPEG')
  print(f'CPU per image, 1 process: read+decode {read_ms:.1f} ms, augment+normalise '
        f'{aug_ms:.1f} ms -> at most {1e3 / (read_ms + aug_ms):.0f} images/s per idle core')
  for workers in (int(w) for w in args.workers.split(',')):
    rate, cpu_ms = throughput(source, workers, args.batch_size, args.batches)
    cpu = f', {cpu_ms:.1f} CPU ms/image in-process' if workers == 0 else ''
    print(f'workers={workers} batch={args.batch_size} crop=512x512: {rate:.0f} images/s wall'
          f'{cpu} (load1 {os.getloadavg()[0]:.1f})')


if __name__ == '__main__':
  main()
