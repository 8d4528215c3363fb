"""Tests for the built-in procedural dataset (semseg_jax/data/shapes.py)."""
import pickle
import time

import numpy as np
import pytest

from semseg_jax.data import shapes

CLASS_IDS = set(range(shapes.NUM_CLASSES)) | {shapes.IGNORE_INDEX}


def test_metadata_is_consistent():
  assert shapes.NUM_CLASSES == len(shapes.CLASS_NAMES) == 6
  assert shapes.CLASS_NAMES[0] == 'background'
  assert shapes.PALETTE.shape == (shapes.NUM_CLASSES, 3) and shapes.PALETTE.dtype == np.uint8
  assert len({tuple(c) for c in shapes.PALETTE}) == shapes.NUM_CLASSES  # Distinct colours.


@pytest.mark.parametrize('size', [(64, 64), (40, 72)])
def test_record_format(size):
  source = shapes.ShapesSource('validation', 5, size)
  assert len(source) == 5
  record = source[3]
  assert set(record) == {'image', 'label', 'file_name'}
  assert record['image'].shape == size + (3,) and record['image'].dtype == np.uint8
  assert record['label'].shape == size and record['label'].dtype == np.uint8
  assert record['file_name'] == 'shapes/validation/000003'
  assert set(np.unique(record['label'])) <= CLASS_IDS


def test_examples_are_a_pure_function_of_seed_split_index_and_size():
  a = shapes.ShapesSource('train', 10, (48, 48), seed=1)
  b = pickle.loads(pickle.dumps(shapes.ShapesSource('train', 10, (48, 48), seed=1)))
  for i in (0, 7, 3, 7):  # Any order, repeated calls, another (unpickled) object.
    np.testing.assert_array_equal(a[i]['image'], b[i]['image'])
    np.testing.assert_array_equal(a[i]['label'], b[i]['label'])
  # num_examples does not change an example.
  np.testing.assert_array_equal(shapes.ShapesSource('train', 500, (48, 48), seed=1)[7]['image'],
                                a[7]['image'])
  reference = a[7]['image']
  for other in (shapes.ShapesSource('train', 10, (48, 48), seed=2)[7],
                shapes.ShapesSource('test', 10, (48, 48), seed=1)[7],
                shapes.ShapesSource('validation', 10, (48, 48), seed=1)[7],
                a[6]):
    assert np.abs(other['image'].astype(int) - reference).mean() > 10


@pytest.mark.parametrize('args, image_sums, label_counts', [
    ((0, 'train', 0, (64, 64)), [498733, 627432, 785656], [2422, 0, 600, 651, 0, 0, 423]),
    ((3, 'validation', 17, (48, 80)), [592214, 558664, 427959], [3291, 151, 0, 214, 0, 0, 184]),
])
def test_golden_examples(args, image_sums, label_counts):
  """The data must not drift: these fingerprints were recorded at _VERSION 1.

  Float transcendental functions may differ in the last bit between CPUs, which
  can move an occasional pixel by one grey level; the tolerance allows that.
  """
  image, label = shapes.generate_example(*args)
  np.testing.assert_allclose(image.astype(np.int64).sum(axis=(0, 1)), image_sums, atol=30)
  counts = np.bincount(label.ravel(), minlength=256)[[0, 1, 2, 3, 4, 5, 255]]
  np.testing.assert_allclose(counts, label_counts, atol=4)


@pytest.fixture(scope='module')
def batch():
  source = shapes.ShapesSource('train', 40, (96, 96))
  return (np.stack([source[i]['image'] for i in range(40)]),
          np.stack([source[i]['label'] for i in range(40)]))


def test_every_class_appears_and_ignore_band_is_thin(batch):
  _, labels = batch
  counts = np.bincount(labels.ravel(), minlength=256)
  assert set(np.flatnonzero(counts)) == CLASS_IDS
  fractions = counts / labels.size
  assert 0.6 < fractions[0] < 0.9  # Mostly background ...
  assert all(fractions[c] > 0.01 for c in range(1, shapes.NUM_CLASSES))  # ... every shape seen.
  assert 0.01 < fractions[shapes.IGNORE_INDEX] < 0.08


def test_ignore_band_separates_classes(batch):
  """Two 4-neighbours never carry different class ids: a 255 pixel is between."""
  _, labels = batch
  for a, b in ((labels[:, 1:], labels[:, :-1]), (labels[:, :, 1:], labels[:, :, :-1])):
    both_labelled = (a != shapes.IGNORE_INDEX) & (b != shapes.IGNORE_INDEX)
    assert not np.any(both_labelled & (a != b))


def _miou(y, pred, k=shapes.NUM_CLASSES):
  cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
  return (np.diag(cm) / np.maximum(cm.sum(0) + cm.sum(1) - np.diag(cm), 1)).mean()


def test_colour_alone_is_not_enough(batch):
  """Per-pixel colour classifiers fit on half the pixels score a low mIoU on the rest.

  Two of them: a linear model on RGB (least squares to one-hot) and the best
  any colour-only rule can do, the majority class of each 16^3 RGB bin.
  """
  images, labels = batch
  y = labels.ravel()
  first_half = np.arange(y.size) < y.size // 2
  train, test = first_half & (y != 255), ~first_half & (y != 255)
  x = np.concatenate([images.reshape(-1, 3) / 255.0, np.ones((y.size, 1))], axis=1)
  weights = np.linalg.lstsq(x[train], np.eye(shapes.NUM_CLASSES)[y[train]], rcond=None)[0]
  assert _miou(y[test], (x[test] @ weights).argmax(1)) < 0.3
  q = images.reshape(-1, 3).astype(np.int64) // 16
  bins = (q[:, 0] * 16 + q[:, 1]) * 16 + q[:, 2]
  counts = np.zeros((16**3, shapes.NUM_CLASSES))
  np.add.at(counts, (bins[train], y[train]), 1)
  assert _miou(y[test], counts[bins[test]].argmax(1)) < 0.3


def test_shapes_differ_in_colour_from_what_lies_beneath(batch):
  """Shape interiors are visible: their colour differs from the background's."""
  images, labels = batch
  inside = (labels > 0) & (labels < shapes.NUM_CLASSES)
  background = labels == 0
  per_image = [np.abs(images[i][inside[i]].mean(0) - images[i][background[i]].mean(0)).max()
               for i in range(len(images)) if inside[i].any()]
  assert np.median(per_image) > 20


def test_generation_is_fast():
  source = shapes.ShapesSource('train', 50, (128, 128))
  source[0]
  start = time.perf_counter()
  for i in range(1, 21):
    source[i]
  per_image = (time.perf_counter() - start) / 20
  # About 2 ms on one core; generous so a loaded CI machine passes.
  assert per_image < 0.015, f'{per_image * 1e3:.1f} ms per 128x128 image'


@pytest.mark.parametrize('kwargs, match', [
    (dict(split='val'), "unknown split 'val'"),
    (dict(num_examples=0), 'num_examples must be a positive int'),
    (dict(num_examples=2.5), 'num_examples must be a positive int'),
    (dict(image_size=(4, 64)), r'image_size must be \(H, W\)'),
    (dict(image_size=(64,)), r'image_size must be \(H, W\)'),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    shapes.ShapesSource(**kwargs)


def test_index_out_of_range():
  source = shapes.ShapesSource('train', 3, (32, 32))
  with pytest.raises(IndexError, match='index 3 out of range'):
    source[3]
  with pytest.raises(IndexError, match='index -1 out of range'):
    source[-1]
