"""Tests for the per-example numpy transforms (semseg_jax/data/transforms.py)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from semseg_jax.data import transforms

IGNORE = transforms.IGNORE_INDEX


def coupled_pair(h, w, seed=0, num_classes=5):
  """An (image, label) pair whose red channel is 40 * label: a spatial op must keep it."""
  rng = np.random.default_rng(seed)
  label = rng.integers(0, num_classes, (h, w)).astype(np.uint8)
  image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
  image[..., 0] = label * 40
  return image, label


def assert_coupled(image, label, pad_rgb=None):
  """Red == 40 * label where labelled; padding pixels have the image fill."""
  labelled = label != IGNORE
  np.testing.assert_array_equal(image[..., 0][labelled], label[labelled] * 40)
  if pad_rgb is not None:
    np.testing.assert_array_equal(image[~labelled], np.broadcast_to(pad_rgb, image[~labelled].shape))


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), oh=st.integers(1, 60), ow=st.integers(1, 60))
def test_resize_label_matches_pil_nearest(h, w, oh, ow):
  label = np.random.default_rng(h * 100 + w).integers(0, 21, (h, w)).astype(np.uint8)
  expected = np.asarray(Image.fromarray(label).resize((ow, oh), Image.NEAREST))
  out = transforms.resize_label(label, (oh, ow))
  np.testing.assert_array_equal(out, expected)


def test_resize_label_never_invents_ids():
  label = np.zeros((30, 30), np.uint8)
  label[10:20, 5:25] = 7
  label[0, :] = IGNORE
  for size in ((17, 45), (61, 13), (30, 30)):
    assert set(np.unique(transforms.resize_label(label, size))) == {0, 7, IGNORE}


def test_resize_image_is_bilinear_and_keeps_dtype():
  ramp = np.tile(np.arange(0, 64, 4, dtype=np.uint8)[None, :, None], (4, 1, 3))  # [4, 16, 3]
  out = transforms.resize_image(ramp, (8, 31))
  assert out.shape == (8, 31, 3) and out.dtype == np.uint8
  # A linear ramp stays (close to) linear and monotone under bilinear upsampling.
  row = out[0, :, 0].astype(int)
  assert np.all(np.diff(row) >= 0) and row[0] <= 2 and row[-1] >= 58


def test_random_scale_range_and_ids():
  image, label = coupled_pair(40, 60)
  sizes = set()
  for seed in range(20):
    im, lb = transforms.random_scale(image, label, np.random.default_rng(seed), (0.5, 1.5))
    assert im.shape[:2] == lb.shape
    assert 20 <= lb.shape[0] <= 60 and 30 <= lb.shape[1] <= 90
    assert abs(lb.shape[0] / 40 - lb.shape[1] / 60) < 0.05  # One factor for both sides.
    assert set(np.unique(lb)) <= set(np.unique(label))
    sizes.add(lb.shape)
  assert len(sizes) > 5


def test_random_crop_of_a_larger_image_is_a_window():
  image, label = coupled_pair(50, 70)
  offsets = set()
  for seed in range(30):
    im, lb = transforms.random_crop(image, label, np.random.default_rng(seed), (32, 40))
    assert im.shape == (32, 40, 3) and lb.shape == (32, 40)
    assert IGNORE not in lb
    # Find the window: it must match the input exactly at one offset.
    matches = [(y, x) for y in range(19) for x in range(31)
               if np.array_equal(label[y:y + 32, x:x + 40], lb)
               and np.array_equal(image[y:y + 32, x:x + 40], im)]
    assert matches
    offsets.add(matches[0])
  assert len(offsets) > 20  # Offsets vary.


@pytest.mark.parametrize('fill', [0, (124, 116, 104)])
def test_random_crop_pads_a_smaller_image(fill):
  image, label = coupled_pair(10, 50)
  pad_rgb = np.broadcast_to(np.asarray(fill, np.uint8), (3,))
  tops = set()
  for seed in range(20):
    im, lb = transforms.random_crop(image, label, np.random.default_rng(seed), (24, 32),
                                    image_fill=fill)
    assert im.dtype == np.uint8 and lb.shape == (24, 32)
    assert_coupled(im, lb, pad_rgb)
    rows = np.flatnonzero((lb != IGNORE).any(1))
    assert len(rows) == 10  # Every row of the short side is kept, ...
    assert (lb != IGNORE).sum() == 10 * 32  # ... and the rest is padding.
    tops.add(rows[0])
  assert len(tops) > 4  # The image lands at varying vertical offsets.


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 30), w=st.integers(1, 30), ch=st.integers(1, 30), cw=st.integers(1, 30),
       seed=st.integers(0, 2**31))
def test_random_crop_properties(h, w, ch, cw, seed):
  image, label = coupled_pair(h, w, seed % 1000)
  im, lb = transforms.random_crop(image, label, np.random.default_rng(seed), (ch, cw),
                                  image_fill=7)
  assert im.shape == (ch, cw, 3) and lb.shape == (ch, cw)
  assert_coupled(im, lb, np.uint8(7))
  assert (lb != IGNORE).sum() == min(h, ch) * min(w, cw)
  assert set(np.unique(lb)) <= set(np.unique(label)) | {IGNORE}


def test_random_flip():
  image, label = coupled_pair(6, 9)
  seen = set()
  for seed in range(40):
    im, lb = transforms.random_flip(image, label, np.random.default_rng(seed), horizontal=True,
                                    vertical=True)
    assert_coupled(im, lb)
    for name, (fi, fl) in {'none': (image, label), 'h': (image[:, ::-1], label[:, ::-1]),
                           'v': (image[::-1], label[::-1]),
                           'hv': (image[::-1, ::-1], label[::-1, ::-1])}.items():
      if np.array_equal(im, fi) and np.array_equal(lb, fl):
        seen.add(name)
  assert seen == {'none', 'h', 'v', 'hv'}
  for seed in range(20):  # vertical=False: rows never move.
    im, _ = transforms.random_flip(image, label, np.random.default_rng(seed), horizontal=True,
                                   vertical=False)
    assert np.array_equal(np.sort(im, axis=1), np.sort(image, axis=1))


def test_color_jitter():
  image, _ = coupled_pair(16, 16)
  np.testing.assert_array_equal(transforms.color_jitter(image, np.random.default_rng(0), 0.0),
                                image.astype(np.float32))
  outs = [transforms.color_jitter(image, np.random.default_rng(s), 0.3) for s in range(10)]
  for out in outs:
    assert out.dtype == np.float32 and out.shape == image.shape
    assert out.min() >= 0 and out.max() <= 255
    # Mild: means move by at most ~(1.3 * 1.3 - 1) of the range.
    assert abs(out.mean() - image.mean()) < 0.7 * image.mean()
  assert len({float(o.mean()) for o in outs}) == 10
  # A grey image has no saturation to change and stays grey.
  grey = np.repeat(image[..., :1], 3, axis=2)
  out = transforms.color_jitter(grey, np.random.default_rng(3), 0.4)
  np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-3)
  np.testing.assert_allclose(out[..., 1], out[..., 2], atol=1e-3)
  # Deterministic given the generator state.
  np.testing.assert_array_equal(transforms.color_jitter(image, np.random.default_rng(5), 0.3),
                                outs[5])


def test_normalize_matches_reference():
  image, _ = coupled_pair(5, 7)
  mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
  out = transforms.normalize(image, mean, std)
  assert out.dtype == np.float32
  expected = (image.astype(np.float64) - np.asarray(mean)) / np.asarray(std)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_resize_pad_for_eval_pads_small_images():
  image, label = coupled_pair(20, 30)
  im, lb = transforms.resize_pad_for_eval(image, label, (32, 32), image_fill=(1, 2, 3))
  np.testing.assert_array_equal(lb[:20, :30], label)
  np.testing.assert_array_equal(im[:20, :30], image)
  assert (lb[20:] == IGNORE).all() and (lb[:, 30:] == IGNORE).all()
  assert (im[20:] == (1, 2, 3)).all() and (im[:, 30:] == (1, 2, 3)).all()


def test_resize_pad_for_eval_shrinks_large_images_keeping_aspect():
  image, label = coupled_pair(64, 128)
  im, lb = transforms.resize_pad_for_eval(image, label, (48, 48))
  assert lb.shape == (48, 48) and im.shape == (48, 48, 3)
  np.testing.assert_array_equal(lb[:24], transforms.resize_label(label, (24, 48)))
  assert (lb[24:] == IGNORE).all()
  assert set(np.unique(lb)) <= set(np.unique(label)) | {IGNORE}
  # Deterministic: no rng at all.
  np.testing.assert_array_equal(transforms.resize_pad_for_eval(image, label, (48, 48))[1], lb)


def test_check_pair_accepts_single_channel_masks_and_rejects_bad_records():
  image, label = coupled_pair(8, 8)
  _, lb = transforms.check_pair(image, label[..., None])
  assert lb.shape == (8, 8)
  with pytest.raises(ValueError, match=r'img_7.png: label shape \(8, 9\) does not match'):
    transforms.check_pair(image, np.zeros((8, 9), np.uint8), 'img_7.png')
  with pytest.raises(ValueError, match='image must be uint8'):
    transforms.check_pair(image.astype(np.float32), label)
  with pytest.raises(ValueError, match='integer class ids'):
    transforms.check_pair(image, label.astype(np.float32))
  with pytest.raises(ValueError, match=r'ids must be in 0..255, got 0..300'):
    transforms.check_pair(image, np.where(label > 2, 300, 0))
  _, lb = transforms.check_pair(image, label.astype(np.int64))
  assert lb.dtype == np.uint8
  np.testing.assert_array_equal(lb, label)


def test_train_transform_chains_everything():
  image, label = coupled_pair(40, 50)
  mean, std = (100.0, 110.0, 120.0), (50.0, 60.0, 70.0)
  # No scaling / jitter: the output must stay coupled after undoing the normalisation.
  t = transforms.TrainTransform((32, 64), mean, std, scale_range=None, hflip=True, vflip=True)
  out = t({'image': image, 'label': label, 'file_name': 'x'}, np.random.default_rng(0))
  assert out['image'].shape == (32, 64, 3) and out['image'].dtype == np.float32
  assert out['label'].shape == (32, 64) and out['label'].dtype == np.int32
  raw = np.rint(out['image'] * np.asarray(std) + np.asarray(mean)).astype(np.int64)
  assert_coupled(raw, out['label'], np.rint(mean).astype(np.int64))
  # With every augmentation on: ids stay within the input's plus ignore.
  t = transforms.TrainTransform((32, 32), mean, std, scale_range=(0.5, 2.0), hflip=True,
                                vflip=True, color_jitter=0.2)
  for seed in range(5):
    out = t({'image': image, 'label': label}, np.random.default_rng(seed))
    assert set(np.unique(out['label'])) <= set(np.unique(label)) | {IGNORE}
    assert np.isfinite(out['image']).all()


def test_eval_transform_and_padding():
  image, label = coupled_pair(20, 24)
  t = transforms.EvalTransform((32, 32), (10.0, 20.0, 30.0), (2.0, 4.0, 8.0))
  out = t({'image': image, 'label': label})
  np.testing.assert_array_equal(out['label'][:20, :24], label)
  np.testing.assert_allclose(out['image'][:20, :24], (image - np.array([10, 20, 30])) /
                             np.array([2, 4, 8]), rtol=1e-6)
  pad = t.padding()
  assert pad['image'].shape == (32, 32, 3) and not pad['image'].any()
  assert (pad['label'] == IGNORE).all() and pad['label'].dtype == np.int32
