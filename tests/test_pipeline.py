"""Tests for the grain pipeline (data/pipeline.py) and the dataset registry (data/__init__.py)."""
import json
import sys
import types

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from semseg_jax import data
from semseg_jax.data import pipeline, shapes, transforms


class IndexSource:
  """Example i: red channel a random texture, green = i everywhere, label = i % 5."""

  def __init__(self, n, size=(12, 12)):
    self.n, self.size = n, size

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    image = np.random.default_rng(i).integers(0, 256, self.size + (3,)).astype(np.uint8)
    image[..., 1] = i
    return {'image': image, 'label': np.full(self.size + (1,), i % 5, np.uint8),
            'file_name': f'{i}.png'}


def make_cfg(**overrides):
  cfg = pipeline.default_dataset_config()
  # Identity normalisation, so pipeline output values are the raw 0-255 pixels.
  cfg.normalization, cfg.mean, cfg.std = 'custom', (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
  cfg.image_size, cfg.scale_range, cfg.hflip = (12, 12), None, False
  cfg.shapes_image_size = (12, 12)  # The eval pad size of 'shapes' is at least this.
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def ids(batch):
  """The source index of every example in a batch (green channel; -1 for padding)."""
  green = batch['image'][:, 0, 0, 1]
  return [int(g) if not (label == 255).all() else -1 for g, label in zip(green, batch['label'])]


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same_batches(a, b, keys=('image', 'label')):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys() == set(keys)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


# --- config -------------------------------------------------------------------------------------


def test_default_config_is_valid_and_complete():
  cfg = pipeline.default_dataset_config()
  pipeline.validate_dataset_config(cfg)
  assert set(cfg.keys()) == set(pipeline._KEYS)
  assert cfg.name == 'shapes' and tuple(cfg.image_size) == (128, 128)


def test_default_config_file_matches_the_pipeline_defaults():
  from configs import default  # pylint: disable=g-import-not-at-top
  assert default.get_config().dataset.to_dict() == pipeline.default_dataset_config().to_dict()


@pytest.mark.parametrize('key, value, match', [
    ('image_size', (0, 128), r'dataset.image_size must be \(H, W\)'),
    ('image_size', (128,), r'dataset.image_size must be \(H, W\)'),
    ('shapes_image_size', (4, 4), r'dataset.shapes_image_size must be \(H, W\) with ints >= 8'),
    ('scale_range', (1.5, 0.5), r'dataset.scale_range must be None or \(lo, hi\)'),
    ('scale_range', (0.0, 1.0), r'dataset.scale_range must be None or \(lo, hi\)'),
    ('color_jitter', 1.5, r'dataset.color_jitter must be a number in \[0, 1\)'),
    ('resize', (32,), r'dataset.resize must be None or \(H, W\)'),
    ('center_crop', (0, 4), r'dataset.center_crop must be None or \(H, W\)'),
    ('eval_pad_size', (512, 51.2), r'dataset.eval_pad_size must be None or \(H, W\)'),
    ('gamma', (1.5, 0.5), r'dataset.gamma must be None or \(lo, hi\)'),
    ('rotate', 200, r'dataset.rotate must be a number in \[0, 180\]'),
    ('rotate', True, r'dataset.rotate must be a number'),
    ('translate', -0.1, r'dataset.translate must be a number in \[0, 1\]'),
    ('hue', 0.6, r'dataset.hue must be a number in \[0, 0.5\]'),
    ('eval_shrink_to_fit', 1, 'dataset.eval_shrink_to_fit must be True or False'),
    ('normalization', 'caffe', "dataset.normalization must be one of imagenet, caffe_bgr, "
     "custom, got 'caffe'"),
    ('mean', (1.0, 2.0, 3.0), r"dataset.mean=\(1.0, 2.0, 3.0\) is only used with "
     r"dataset.normalization='custom' \(dataset.normalization='imagenet' has its own\)"),
    ('num_workers', -1, 'dataset.num_workers must be an int >= 0'),
    ('prefetch', -2, 'dataset.prefetch must be an int >= 0'),
    ('num_train', 0, 'dataset.num_train must be an int >= 1'),
    ('name', '', 'dataset.name must be a non-empty string'),
    ('eval_split', '', 'dataset.eval_split must be a non-empty string'),
])
def test_bad_values_name_the_key(key, value, match):
  cfg = pipeline.default_dataset_config().to_dict()
  cfg[key] = value
  with pytest.raises(ValueError, match=match):
    pipeline.validate_dataset_config(cfg)


@pytest.mark.parametrize('key, value, match', [
    ('mean', (1.0, 2.0), 'dataset.mean must be 3 non-negative numbers'),
    ('mean', None, 'dataset.mean must be 3 non-negative numbers'),
    ('std', (1.0, 0.0, 1.0), 'dataset.std must be 3 positive numbers'),
])
def test_custom_normalization_needs_mean_and_std(key, value, match):
  cfg = make_cfg().to_dict()
  cfg[key] = value
  with pytest.raises(ValueError, match=match):
    pipeline.validate_dataset_config(cfg)


def test_normalization_resolves_presets_and_custom():
  cfg = pipeline.default_dataset_config()
  assert pipeline.normalization(cfg) == transforms.NORMALIZATIONS['imagenet']
  cfg.normalization = 'caffe_bgr'
  norm = pipeline.normalization(cfg)
  assert norm.bgr and norm.mean == (103.939, 116.779, 123.68) and norm.std == (1.0, 1.0, 1.0)
  cfg.normalization, cfg.mean, cfg.std = 'custom', (1, 2, 3), (4, 5, 6)
  pipeline.validate_dataset_config(cfg)
  assert pipeline.normalization(cfg) == transforms.Normalization((1.0, 2.0, 3.0),
                                                                 (4.0, 5.0, 6.0))


def test_caffe_bgr_pipeline_output():
  cfg = make_cfg(normalization='caffe_bgr', mean=None, std=None)
  batch = next(pipeline.make_eval_iterator(IndexSource(2), cfg, batch_size=2))
  raw = IndexSource(2)[1]['image'].astype(np.float32)
  np.testing.assert_allclose(batch['image'][1, :12, :12],
                             raw[..., ::-1] - np.float32([103.939, 116.779, 123.68]), atol=1e-4)


def test_unknown_and_missing_keys():
  cfg = pipeline.default_dataset_config().to_dict()
  with pytest.raises(ValueError, match='dataset.crop_size is not a known dataset option'):
    pipeline.validate_dataset_config({**cfg, 'crop_size': 3})
  del cfg['hflip']
  with pytest.raises(ValueError, match='dataset.hflip is missing'):
    pipeline.validate_dataset_config(cfg)


# --- train --------------------------------------------------------------------------------------


def test_train_batches_have_the_contract_format():
  cfg = pipeline.default_dataset_config()
  cfg.shapes_image_size, cfg.image_size, cfg.num_train = (48, 48), (32, 40), 20
  source = data.get_source(cfg, 'train')
  batch = next(pipeline.make_train_iterator(source, cfg, seed=0, batch_size=4))
  assert batch.keys() == {'image', 'label'}
  assert batch['image'].shape == (4, 32, 40, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (4, 32, 40) and batch['label'].dtype == np.int32
  assert set(np.unique(batch['label'])) <= set(range(shapes.NUM_CLASSES)) | {255}
  # ImageNet normalisation: values roughly centred.
  assert -2.2 < batch['image'].min() < 0 < batch['image'].max() < 2.7


def test_train_order_reshuffles_every_epoch_and_depends_only_on_the_seed():
  cfg = make_cfg()
  epochs = [ids(b) for b in take(pipeline.make_train_iterator(IndexSource(12), cfg, seed=3,
                                                              batch_size=4), 9)]
  orders = [sum(epochs[e * 3:(e + 1) * 3], []) for e in range(3)]
  for order in orders:
    assert sorted(order) == list(range(12))  # Each epoch: every example exactly once.
  assert orders[0] != orders[1] != orders[2]
  again = [ids(b) for b in take(pipeline.make_train_iterator(IndexSource(12), cfg, seed=3,
                                                             batch_size=4), 9)]
  assert again == epochs
  other = [ids(b) for b in take(pipeline.make_train_iterator(IndexSource(12), cfg, seed=4,
                                                             batch_size=4), 3)]
  assert other != epochs[:3]


def test_processes_get_disjoint_slices_of_each_global_batch():
  cfg = make_cfg()
  source = IndexSource(30)
  global_batches = take(pipeline.make_train_iterator(source, cfg, seed=0, batch_size=6), 8)
  local = [take(pipeline.make_train_iterator(source, cfg, seed=0, batch_size=2, process_index=p,
                                             process_count=3), 8) for p in range(3)]
  for step, global_batch in enumerate(global_batches):
    parts = [ids(local[p][step]) for p in range(3)]
    flat = sum(parts, [])
    assert len(set(flat)) == 6  # Disjoint ...
    assert sorted(flat) == sorted(ids(global_batch))  # ... and together the global batch.
    # The strided layout: process p holds stream elements p, p + 3 (of the global batch).
    assert [ids(global_batch)[p::3] for p in range(3)] == parts


def test_augmentation_depends_on_seed_epoch_and_example_only():
  """Example i in epoch e gets the same crop/flip whatever the batch size or sharding."""
  # (No colour jitter: the green channel must keep identifying the example.)
  cfg = make_cfg(image_size=(6, 6), hflip=True, vflip=True, scale_range=(0.8, 1.2))
  source = IndexSource(8)

  def augmented(batch_size, process_count, steps):
    local = []  # Per process: its stream of (index, image).
    for p in range(process_count):
      it = pipeline.make_train_iterator(source, cfg, seed=1, batch_size=batch_size,
                                        process_index=p, process_count=process_count)
      local.append([(i, image) for batch in take(it, steps)
                    for i, image in zip(ids(batch), batch['image'])])
    # Global element k is element k // P of process k % P.
    stream = [local[k % process_count][k // process_count]
              for k in range(sum(map(len, local)))]
    out, seen = {}, {}  # (epoch, index) -> image
    for i, image in stream:
      seen[i] = seen.get(i, -1) + 1
      out[(seen[i], i)] = image
    return out

  reference = augmented(4, 1, 4)  # Two epochs.
  for batch_size, process_count, steps in ((2, 1, 8), (1, 2, 8)):
    other = augmented(batch_size, process_count, steps)
    assert other.keys() == reference.keys()
    for key in other:
      np.testing.assert_array_equal(other[key], reference[key])
  # ... and epochs differ.
  assert any(not np.array_equal(reference[(0, i)], reference[(1, i)]) for i in range(8))


def checkpoint_roundtrip(cfg, n=3, m=4):
  source = IndexSource(10)
  it = pipeline.make_train_iterator(source, cfg, seed=0, batch_size=3)
  take(it, n)
  state = json.loads(json.dumps(it.get_state()))  # Must survive JSON (Orbax stores JSON).
  expected = take(it, m)
  fresh = pipeline.make_train_iterator(source, cfg, seed=0, batch_size=3)
  fresh.set_state(state)
  restored = take(fresh, m)
  for i in (it, fresh):
    i.close()
  return expected, restored


def test_iterator_state_restores_the_same_batches():
  expected, restored = checkpoint_roundtrip(make_cfg(hflip=True, scale_range=(0.5, 1.5)))
  assert_same_batches(expected, restored)


def test_worker_processes_give_the_same_batches_and_restore():
  cfg = make_cfg(hflip=True, scale_range=(0.5, 1.5), num_workers=2)
  expected, restored = checkpoint_roundtrip(cfg)
  assert_same_batches(expected, restored)
  # Batches are formed before the worker split: num_workers does not change the data.
  in_process, _ = checkpoint_roundtrip(make_cfg(hflip=True, scale_range=(0.5, 1.5)))
  assert_same_batches(expected, in_process)


def test_orbax_checkpoint_of_the_iterator(tmp_path):
  """Async CheckpointManager + grain.checkpoint, as semseg_jax/checkpoint.py uses them."""
  cfg = make_cfg(hflip=True)
  source = IndexSource(10)
  manager = ocp.CheckpointManager(
      tmp_path / 'ckpt', options=ocp.CheckpointManagerOptions(enable_async_checkpointing=True),
      item_handlers={'data': grain.checkpoint.CheckpointHandler()})
  it = pipeline.make_train_iterator(source, cfg, seed=0, batch_size=3)
  take(it, 2)
  manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  expected = take(it, 3)  # Training goes on while the save may still be running.
  manager.wait_until_finished()
  fresh = pipeline.make_train_iterator(source, cfg, seed=0, batch_size=3)
  manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert_same_batches(expected, take(fresh, 3))
  manager.close()


def test_bad_sharding_arguments():
  cfg, source = make_cfg(), IndexSource(4)
  with pytest.raises(ValueError, match=r'process_index must be in \[0, 2\), got 2'):
    pipeline.make_train_iterator(source, cfg, seed=0, batch_size=2, process_index=2,
                                 process_count=2)
  with pytest.raises(ValueError, match='per-process batch_size must be a positive int'):
    pipeline.make_eval_iterator(source, cfg, batch_size=0)
  with pytest.raises(ValueError, match="split 'train' is empty"):
    pipeline.make_train_iterator(IndexSource(0), cfg, seed=0, batch_size=2)


# --- eval ---------------------------------------------------------------------------------------


@pytest.mark.parametrize('n, batch_size, process_count', [(10, 2, 3), (12, 2, 3), (5, 4, 1),
                                                          (1, 3, 2)])
def test_eval_covers_every_example_once_with_padding(n, batch_size, process_count):
  cfg = make_cfg(image_size=(16, 16))  # Larger than the source: padded, never resized.
  source = IndexSource(n)
  expected_batches = pipeline.num_eval_batches(n, batch_size, process_count)
  assert expected_batches == -(-n // (batch_size * process_count))
  seen = []
  for p in range(process_count):
    batches = list(pipeline.make_eval_iterator(source, cfg, batch_size=batch_size,
                                               process_index=p, process_count=process_count))
    assert len(batches) == expected_batches  # Every process runs the same number of steps.
    for batch in batches:
      assert batch.keys() == {'image', 'label', 'valid'}
      assert batch['image'].shape == (batch_size, 16, 16, 3)
      assert batch['valid'].shape == (batch_size, 16, 16) and batch['valid'].dtype == bool
      np.testing.assert_array_equal(batch['valid'], np.stack(
          [np.pad(np.ones((12, 12), bool), ((0, 4), (0, 4))) if i >= 0
           else np.zeros((16, 16), bool) for i in ids(batch)]))
      assert batch['label'].shape == (batch_size, 16, 16) and batch['label'].dtype == np.int32
      for image, label, i in zip(batch['image'], batch['label'], ids(batch)):
        if i < 0:  # Padding example: zero image, all ignore.
          assert not image.any()
        else:
          assert (label[:12, :12] == i % 5).all() and (label[12:] == 255).all()
      seen += [i for i in ids(batch) if i >= 0]
  assert sorted(seen) == list(range(n))


def test_eval_padding_leaves_the_confusion_matrix_unchanged():
  def confusion(labels, preds, k=5):
    keep = labels != 255
    return np.bincount(labels[keep] * k + preds[keep], minlength=k * k).reshape(k, k)

  cfg = make_cfg()
  source = IndexSource(7)
  predict = lambda images: (images[..., 0].astype(np.int64) // 16) % 5  # Any fixed rule.
  padded = sum(confusion(b['label'], predict(b['image']))
               for b in pipeline.make_eval_iterator(source, cfg, batch_size=3))
  transform = pipeline.eval_transform(cfg)
  plain = sum(confusion(ex['label'], predict(ex['image']))
              for ex in (transform(source[i]) for i in range(7)))
  np.testing.assert_array_equal(padded, plain)
  assert plain.sum() == 7 * 12 * 12


def test_eval_with_worker_processes_matches_in_process():
  source = IndexSource(9)
  a = list(pipeline.make_eval_iterator(source, make_cfg(), batch_size=2))
  b = list(pipeline.make_eval_iterator(source, make_cfg(num_workers=2), batch_size=2))
  assert_same_batches(a, b, keys=('image', 'label', 'valid'))


class SizedSource:
  """Images of the given (H, W) sizes, label = example index, TFDS-style bytes file names."""

  def __init__(self, sizes):
    self.sizes = sizes

  def __len__(self):
    return len(self.sizes)

  def __getitem__(self, i):
    h, w = self.sizes[i]
    image = np.full((h, w, 3), 10 * i, np.uint8)
    return {'image': image, 'label': np.full((h, w, 1), i, np.uint8),
            'file_name': f'img_{i}.jpg'.encode()}


def test_eval_keeps_full_resolution_with_a_valid_mask():
  sizes = [(20, 30), (32, 16), (7, 40)]
  cfg = make_cfg(image_size=(8, 8), eval_pad_size=(32, 40))
  batch = next(pipeline.make_eval_iterator(SizedSource(sizes), cfg, batch_size=4))
  assert batch['image'].shape == (4, 32, 40, 3)
  for i, (h, w) in enumerate(sizes):
    np.testing.assert_array_equal(batch['valid'][i], np.pad(np.ones((h, w), bool),
                                                            ((0, 32 - h), (0, 40 - w))))
    # Real pixels untouched (no resize), padding is ignore.
    assert (batch['label'][i][batch['valid'][i]] == i).all()
    assert (batch['label'][i][~batch['valid'][i]] == 255).all()
    assert (batch['image'][i][batch['valid'][i]] == 10 * i).all()
  assert not batch['valid'][3].any()  # The padding example.
  # Valid pixels are exactly the non-ignore ones here: a metric masked by either agrees.
  np.testing.assert_array_equal(batch['valid'], batch['label'] != 255)


def test_eval_image_larger_than_pad_size():
  cfg = make_cfg(image_size=(16, 16), eval_pad_size=(32, 32))
  source = SizedSource([(20, 20), (40, 24)])
  with pytest.raises(ValueError, match=r'img_1.jpg: image of 40x24 does not fit the eval pad '
                     r'size 32x32; set dataset.eval_pad_size to at least \(64, 32\)'):
    list(pipeline.make_eval_iterator(source, cfg, batch_size=2))
  cfg.eval_shrink_to_fit = True
  batch = next(pipeline.make_eval_iterator(source, cfg, batch_size=2))
  assert batch['valid'][1].sum() == 32 * 19 and batch['valid'][0].sum() == 400


def test_eval_pad_size_defaults():
  cfg = make_cfg(image_size=(24, 24))
  assert pipeline.eval_pad_size(cfg) == (24, 24)
  cfg.name, cfg.shapes_image_size = 'shapes', (48, 16)
  assert pipeline.eval_pad_size(cfg) == (48, 24)  # shapes: its known size.
  cfg.name = 'voc2012'
  assert pipeline.eval_pad_size(cfg) == (512, 512)  # VOC's largest image, rounded up.
  cfg.name, cfg.image_size = 'cityscapes', (769, 769)
  assert pipeline.eval_pad_size(cfg) == (1024, 2048)
  cfg.image_size = (1100, 769)
  assert pipeline.eval_pad_size(cfg) == (1100, 2048)  # Per side, at least the crop.
  cfg.name, cfg.image_size = 'ade20k', (24, 24)
  assert pipeline.eval_pad_size(cfg) == (24, 24)  # Unbounded sizes: the train crop.
  cfg.resize = (100, 60)
  assert pipeline.eval_pad_size(cfg) == (100, 60)  # Everything is resized to this.
  cfg.eval_pad_size = (128, 64)
  assert pipeline.eval_pad_size(cfg) == (128, 64)


def test_eval_resize_then_pad():
  cfg = make_cfg(resize=(10, 20), eval_pad_size=(16, 32))
  batch = next(pipeline.make_eval_iterator(SizedSource([(40, 24)]), cfg, batch_size=1))
  assert batch['valid'][0].sum() == 200 and batch['valid'][0, :10, :20].all()


def test_train_error_names_the_decoded_file_name():
  source = SizedSource([(10, 10)])
  bad = {**source[0], 'label': np.zeros((9, 10), np.uint8)}
  with pytest.raises(ValueError, match=r"^img_0.jpg: label shape \(9, 10\)"):
    pipeline.train_transform(make_cfg())(bad, np.random.default_rng(0))


def test_train_with_every_augmentation_is_reproducible():
  cfg = make_cfg(image_size=(16, 16), resize=(20, 20), center_crop=(18, 18),
                 scale_range=(0.8, 1.2), rotate=15.0, translate=0.1, hflip=True, vflip=True,
                 hue=0.05, gamma=(0.8, 1.2), color_jitter=0.2)
  source = SizedSource([(20, 30), (32, 16), (25, 25), (12, 40)])
  a = take(pipeline.make_train_iterator(source, cfg, seed=5, batch_size=2), 4)
  b = take(pipeline.make_train_iterator(source, cfg, seed=5, batch_size=2), 4)
  assert_same_batches(a, b)
  for batch in a:
    assert batch['image'].shape == (2, 16, 16, 3) and np.isfinite(batch['image']).all()
    assert set(np.unique(batch['label'])) <= {0, 1, 2, 3, 255}


# --- registry -----------------------------------------------------------------------------------


def test_shapes_info_and_source_follow_the_config():
  info = data.get_dataset_info('shapes')
  assert (info.name, info.num_classes, info.ignore_index) == ('shapes', 6, 255)
  assert info.class_names == shapes.CLASS_NAMES
  np.testing.assert_array_equal(info.palette, shapes.PALETTE)
  cfg = pipeline.default_dataset_config()
  cfg.num_train, cfg.num_eval, cfg.shapes_image_size = 30, 7, (40, 56)
  train, val = data.get_source(cfg, 'train'), data.get_source(cfg, 'validation')
  assert (len(train), len(val)) == (30, 7)
  assert val[0]['image'].shape == (40, 56, 3)
  assert not np.array_equal(train[0]['image'], val[0]['image'])
  with pytest.raises(ValueError, match="splits .* got 'val'"):
    data.get_source(cfg, 'val')


def test_dataset_info_validates_itself():
  with pytest.raises(ValueError, match='2 class names for num_classes=3'):
    data.DatasetInfo('x', 3, ('a', 'b'), np.zeros((3, 3)))
  with pytest.raises(ValueError, match=r'palette shape \(2, 3\), expected \(3, 3\)'):
    data.DatasetInfo('x', 3, ('a', 'b', 'c'), np.zeros((2, 3)))


def test_unknown_dataset_error_says_how_to_switch():
  with pytest.raises(data.DatasetNotFoundError) as e:
    data.get_dataset_info('vocc2012')
  message = str(e.value)
  assert isinstance(e.value, ValueError) and '\n' not in message
  assert "'vocc2012'" in message and 'shapes' in message
  assert '--config.dataset.name=shapes --config.num_classes=6' in message


@pytest.fixture
def registry(monkeypatch):
  data.list_datasets()  # Import every builder module first, into the real registry.
  monkeypatch.setattr(data, '_REGISTRY', dict(data._REGISTRY))
  info = data.DatasetInfo('toyseg', 2, ('bg', 'fg'), [[0, 0, 0], [255, 255, 255]])
  data.register_dataset('toyseg', lambda data_dir: info, tfds_name='toy_seg_builder')
  return info


def test_register_and_lookup(registry):
  assert data.get_dataset_info('toyseg', data_dir='/anywhere') is registry
  assert 'toyseg' in data.list_datasets() and 'shapes' in data.list_datasets()
  with pytest.raises(ValueError, match="'toyseg' registered twice"):
    data.register_dataset('toyseg', registry)


def test_missing_data_dir_raises_dataset_not_found(registry, tmp_path):
  cfg = make_cfg(name='toyseg')
  missing = str(tmp_path / 'nope')
  with pytest.raises(data.DatasetNotFoundError) as e:
    data.get_source(cfg, 'train', data_dir=missing)
  message = str(e.value)
  assert '\n' not in message
  assert "'toyseg'" in message and missing in message and 'does not exist' in message
  assert f'python -m semseg_jax.data.prepare --dataset=toyseg --data_dir={missing}' in message
  assert 'Datasets' in message
  assert '--config.dataset.name=shapes --config.num_classes=6' in message


def test_unprepared_tfds_dataset_raises_dataset_not_found(registry, tmp_path):
  """TFDS does not know the builder (or it is not built): one clear line, no TensorFlow."""
  with pytest.raises(data.DatasetNotFoundError) as e:
    data.get_source(make_cfg(name='toyseg'), 'train', data_dir=str(tmp_path))
  message = str(e.value)
  assert '\n' not in message and str(tmp_path) in message and 'toy_seg_builder' in message
  assert 'tensorflow' not in sys.modules


def fake_tfds(monkeypatch, prepared, records):
  """Replaces tfds.builder / tfds.data_source; returns the recorded data_source calls."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  calls = []
  builder = types.SimpleNamespace(
      is_prepared=lambda: prepared, data_dir='/data/toy_seg_builder/1.0.0',
      info=types.SimpleNamespace(splits={'train': None, 'validation': None}))
  monkeypatch.setattr(tfds, 'builder', lambda name, data_dir=None: builder)

  def data_source(name, **kwargs):
    calls.append((name, kwargs))
    return records
  monkeypatch.setattr(tfds, 'data_source', data_source)
  return calls


def test_prepared_tfds_dataset_is_read_without_downloading(registry, monkeypatch, tmp_path):
  records = [IndexSource(4)[i] for i in range(4)]  # Labels [H, W, 1], as TFDS stores masks.
  calls = fake_tfds(monkeypatch, True, records)
  source = data.get_source(make_cfg(name='toyseg'), 'validation', data_dir=str(tmp_path))
  assert source is records
  assert calls == [('toy_seg_builder', dict(split='validation', data_dir=str(tmp_path),
                                            download=False))]
  batch = next(pipeline.make_eval_iterator(source, make_cfg(name='toyseg'), batch_size=4))
  assert ids(batch) == [0, 1, 2, 3] and batch['label'].shape == (4, 12, 12)
  with pytest.raises(ValueError, match=r"no split 'test'; prepared splits: \['train', 'val"):
    data.get_source(make_cfg(name='toyseg'), 'test', data_dir=str(tmp_path))


def test_not_prepared_builder(registry, monkeypatch, tmp_path):
  fake_tfds(monkeypatch, False, [])
  with pytest.raises(data.DatasetNotFoundError, match='nothing at /data/toy_seg_builder/1.0.0'):
    data.get_source(make_cfg(name='toyseg'), 'train', data_dir=str(tmp_path))


# --- per-dataset presets (configs/datasets) ------------------------------------------------------


@pytest.mark.parametrize('preset, name, num_classes, crop, pad', [
    ('voc', 'voc2012', 21, (512, 512), (512, 512)),
    ('cityscapes', 'cityscapes', 19, (512, 1024), (1024, 2048)),
    ('camvid', 'camvid', 11, (360, 480), (360, 480)),
    ('ade20k', 'ade20k', 150, (512, 512), (704, 704)),
])
def test_dataset_presets_load_and_validate(preset, name, num_classes, crop, pad):
  from configs import datasets, default  # pylint: disable=g-import-not-at-top
  from semseg_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = datasets.PRESETS[preset](default.get_config())
  config_lib.validate_config(config)  # Also runs validate_dataset_config.
  assert config.dataset.name == name and config.num_classes == num_classes
  assert tuple(config.dataset.image_size) == crop
  assert pipeline.eval_pad_size(config.dataset) == pad
  assert pipeline.normalization(config.dataset) == transforms.NORMALIZATIONS['imagenet']
  # The class count agrees with the registered dataset (no data needed).
  assert data.get_dataset_info(name).num_classes == num_classes
  # Crop and normalisation are arguments.
  config = datasets.PRESETS[preset](default.get_config(), (96, 128), normalization='caffe_bgr')
  config_lib.validate_config(config)
  assert tuple(config.dataset.image_size) == (96, 128)
  assert pipeline.normalization(config.dataset).bgr


def test_dataset_preset_resize_evaluates_at_that_size():
  from configs import datasets, default  # pylint: disable=g-import-not-at-top
  config = datasets.cityscapes(default.get_config(), crop=(512, 1024), resize=(512, 1024))
  pipeline.validate_dataset_config(config.dataset)
  assert tuple(config.dataset.resize) == (512, 1024)
  assert pipeline.eval_pad_size(config.dataset) == (512, 1024)  # Not the full 1024x2048.


def test_dataset_preset_rejects_a_bad_crop():
  from configs import datasets, default  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r'cityscapes preset: crop must be \(H, W\)'):
    datasets.cityscapes(default.get_config(), crop=(0, 769))
