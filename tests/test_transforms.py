"""Tests for the per-example numpy transforms (semseg_jax/data/transforms.py)."""
import colorsys

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
    padding = image[~labelled]
    np.testing.assert_array_equal(padding, np.broadcast_to(pad_rgb, padding.shape))


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
  norm = transforms.Normalization((100.0, 110.0, 120.0), (50.0, 60.0, 70.0))
  # No scaling / jitter: the output must stay coupled after undoing the normalisation.
  t = transforms.TrainTransform((32, 64), norm, hflip=True, vflip=True)
  out = t({'image': image, 'label': label, 'file_name': 'x'}, np.random.default_rng(0))
  assert out['image'].shape == (32, 64, 3) and out['image'].dtype == np.float32
  assert out['label'].shape == (32, 64) and out['label'].dtype == np.int32
  raw = np.rint(out['image'] * np.asarray(norm.std) + np.asarray(norm.mean)).astype(np.int64)
  assert_coupled(raw, out['label'], np.rint(norm.mean).astype(np.int64))
  # With every augmentation on: ids stay within the input's plus ignore.
  t = transforms.TrainTransform((32, 32), norm, resize=(44, 52), center_crop=(40, 48),
                                scale_range=(0.5, 2.0), rotate=30.0, translate=0.2, hflip=True,
                                vflip=True, hue=0.1, gamma=(0.7, 1.5), color_jitter=0.2)
  outs = [t({'image': image, 'label': label}, np.random.default_rng(seed)) for seed in range(6)]
  for out in outs:
    assert out['image'].shape == (32, 32, 3) and out['label'].shape == (32, 32)
    assert set(np.unique(out['label'])) <= set(np.unique(label)) | {IGNORE}
    assert np.isfinite(out['image']).all()
  assert len({o['image'].tobytes() for o in outs}) == 6
  # A pure function of the generator.
  again = t({'image': image, 'label': label}, np.random.default_rng(3))
  np.testing.assert_array_equal(again['image'], outs[3]['image'])
  np.testing.assert_array_equal(again['label'], outs[3]['label'])


def test_train_transform_steps_that_are_off_draw_nothing():
  """Adding off steps leaves the random stream (and so old runs) unchanged."""
  image, label = coupled_pair(40, 50)
  record = {'image': image, 'label': label}
  base = transforms.TrainTransform((24, 24), scale_range=(0.5, 1.5), hflip=True)
  off = transforms.TrainTransform((24, 24), scale_range=(0.5, 1.5), hflip=True, rotate=0.0,
                                  translate=0.0, hue=0.0, gamma=None)
  a = base(record, np.random.default_rng(9))
  b = off(record, np.random.default_rng(9))
  np.testing.assert_array_equal(a['image'], b['image'])
  np.testing.assert_array_equal(a['label'], b['label'])


def test_train_transform_resize_then_center_crop():
  image, label = coupled_pair(30, 40)
  t = transforms.TrainTransform((20, 20), transforms.Normalization((0, 0, 0), (1, 1, 1)),
                                resize=(60, 80), center_crop=(20, 20))
  out = t({'image': image, 'label': label}, np.random.default_rng(0))
  big = transforms.resize_label(label, (60, 80))
  np.testing.assert_array_equal(out['label'], big[20:40, 30:50])


def test_eval_transform_keeps_resolution_and_masks_padding():
  image, label = coupled_pair(20, 24)
  norm = transforms.Normalization((10.0, 20.0, 30.0), (2.0, 4.0, 8.0))
  t = transforms.EvalTransform((32, 40), norm)
  out = t({'image': image, 'label': label, 'file_name': b'a.jpg'})
  assert out.keys() == {'image', 'label', 'valid'}
  assert out['image'].shape == (32, 40, 3) and out['valid'].dtype == bool
  np.testing.assert_array_equal(out['label'][:20, :24], label)
  assert (out['label'][20:] == IGNORE).all() and (out['label'][:, 24:] == IGNORE).all()
  expected_valid = np.zeros((32, 40), bool)
  expected_valid[:20, :24] = True
  np.testing.assert_array_equal(out['valid'], expected_valid)
  np.testing.assert_allclose(out['image'][:20, :24], (image - np.array([10, 20, 30])) /
                             np.array([2, 4, 8]), rtol=1e-6)
  # Padding is the mean: ~0 after normalisation.
  np.testing.assert_allclose(out['image'][~out['valid']], 0, atol=0.26)
  pad = t.padding()
  assert pad['image'].shape == (32, 40, 3) and not pad['image'].any()
  assert (pad['label'] == IGNORE).all() and pad['label'].dtype == np.int32
  assert not pad['valid'].any() and pad['valid'].shape == (32, 40)


def test_eval_transform_too_large_names_file_and_sizes():
  image, label = coupled_pair(40, 24)
  t = transforms.EvalTransform((32, 32))
  with pytest.raises(ValueError, match=r'^2008_0001.jpg: image of 40x24 does not fit the eval '
                     r'pad size 32x32; set dataset.eval_pad_size to at least \(64, 32\)'):
    t({'image': image, 'label': label, 'file_name': np.bytes_(b'2008_0001.jpg')})
  shrink = transforms.EvalTransform((32, 32), shrink_to_fit=True)
  out = shrink({'image': image, 'label': label})
  assert out['valid'].sum() == 32 * 19  # 40x24 -> 32x19, aspect kept.
  np.testing.assert_array_equal(out['label'][:, :19], transforms.resize_label(label, (32, 19)))


def test_eval_transform_resize_first():
  image, label = coupled_pair(40, 60)
  out = transforms.EvalTransform((32, 32), resize=(20, 30))({'image': image, 'label': label})
  np.testing.assert_array_equal(out['label'][:20, :30], transforms.resize_label(label, (20, 30)))
  assert out['valid'].sum() == 600


# --- new geometric transforms ------------------------------------------------------------------


@pytest.mark.parametrize('k', [1, 2, 3, -1])
def test_rotate_by_90_is_rot90_on_a_square(k):
  image, label = coupled_pair(12, 12, seed=k + 5)
  im, lb = transforms.rotate(image, label, 90.0 * k, image_fill=(1, 2, 3))
  np.testing.assert_array_equal(im, np.rot90(image, k))
  np.testing.assert_array_equal(lb, np.rot90(label, k))


def test_rotate_by_90_on_a_rectangle_matches_rot90_in_the_centre():
  image, label = coupled_pair(8, 12)
  im, lb = transforms.rotate(image, label, 90.0, image_fill=(1, 2, 3))
  # The 12x8 rotated content is centred on the 8x12 canvas: its middle 8 rows fit.
  np.testing.assert_array_equal(lb[:, 2:10], np.rot90(label)[2:10])
  np.testing.assert_array_equal(im[:, 2:10], np.rot90(image)[2:10])
  assert (lb[:, :2] == IGNORE).all() and (lb[:, 10:] == IGNORE).all()
  assert (im[:, :2] == (1, 2, 3)).all() and (im[:, 10:] == (1, 2, 3)).all()


@settings(max_examples=25, deadline=None)
@given(degrees=st.floats(-180, 180), seed=st.integers(0, 1000))
def test_rotate_labels_only_keep_input_ids(degrees, seed):
  image, label = coupled_pair(17, 23, seed=seed)
  label[0, 0] = 4
  im, lb = transforms.rotate(image, label, degrees)
  assert lb.shape == (17, 23) and lb.dtype == np.uint8 and im.shape == (17, 23, 3)
  assert set(np.unique(lb)) <= set(np.unique(label)) | {IGNORE}
  # The centre pixel is the rotation's fixed point.
  assert lb[8, 11] == label[8, 11]


def test_rotate_zero_is_identity_and_random_rotate_varies():
  image, label = coupled_pair(16, 16)
  im, lb = transforms.rotate(image, label, 0.0)
  assert im is image and lb is label
  ignored = {int((transforms.random_rotate(image, label, np.random.default_rng(s), 20.0)[1]
                  == IGNORE).sum()) for s in range(8)}
  assert len(ignored) > 3 and max(ignored) > 0


def test_translate_matches_numpy_shift():
  image, label = coupled_pair(10, 14)
  im, lb = transforms.translate(image, label, (3, -5), image_fill=9)
  expected = np.full_like(label, IGNORE)
  expected[3:, :9] = label[:7, 5:]
  np.testing.assert_array_equal(lb, expected)
  assert_coupled(im, lb, np.uint8(9))
  im, lb = transforms.translate(image, label, (0, 0))
  np.testing.assert_array_equal(lb, label)
  # random_translate stays within max_fraction of each side.
  for seed in range(10):
    _, lb = transforms.random_translate(image, label, np.random.default_rng(seed), 0.2)
    assert (lb == IGNORE).sum() <= 10 * 14 - (10 - 2) * (14 - 3)


def test_center_crop_and_pad():
  image, label = coupled_pair(9, 20)
  im, lb = transforms.center_crop(image, label, (5, 12))
  np.testing.assert_array_equal(lb, label[2:7, 4:16])
  np.testing.assert_array_equal(im, image[2:7, 4:16])
  im, lb = transforms.center_crop(image, label, (13, 20), image_fill=3)
  np.testing.assert_array_equal(lb[2:11], label)
  assert (lb[:2] == IGNORE).all() and (lb[11:] == IGNORE).all()
  assert_coupled(im, lb, np.uint8(3))


def test_resize_pair_changes_aspect():
  image, label = coupled_pair(10, 20)
  im, lb = transforms.resize(image, label, (30, 15))
  assert im.shape == (30, 15, 3)
  np.testing.assert_array_equal(lb, transforms.resize_label(label, (30, 15)))


# --- colour ------------------------------------------------------------------------------------


def test_hue_zero_is_identity_and_shift_matches_colorsys():
  image, _ = coupled_pair(6, 7, seed=2)
  assert transforms.adjust_hue(image, 0.0) is image
  for shift in (0.1, -0.25, 0.5):
    out = transforms.adjust_hue(image, shift)
    assert out.dtype == np.uint8 and out.shape == image.shape
    expected = np.empty(image.shape)
    for idx in np.ndindex(image.shape[:2]):
      h, s, v = colorsys.rgb_to_hsv(*(image[idx] / 255.0))
      expected[idx] = np.asarray(colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)) * 255
    # uint8 HSV quantises hue to 1/256 turn: a few levels of error at most.
    np.testing.assert_allclose(out, expected, atol=6)
    assert np.abs(out - expected).mean() < 2
  # Greys have no hue.
  grey = np.repeat(image[..., :1], 3, axis=2)
  np.testing.assert_array_equal(transforms.adjust_hue(grey, 0.3), grey)


def test_gamma_matches_formula():
  image, _ = coupled_pair(8, 8)
  assert transforms.adjust_gamma(image, 1.0) is image
  for gamma in (0.5, 2.2):
    out = transforms.adjust_gamma(image, gamma)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.rint(255 * (image / 255.0) ** gamma).astype(np.uint8))


def test_train_transform_gamma_and_hue_ranges():
  image = np.full((8, 8, 3), 64, np.uint8)
  label = np.zeros((8, 8), np.uint8)
  ident = transforms.Normalization((0, 0, 0), (1, 1, 1))
  t = transforms.TrainTransform((8, 8), ident, gamma=(0.5, 0.5))
  out = t({'image': image, 'label': label}, np.random.default_rng(0))
  np.testing.assert_array_equal(out['image'], np.rint(255 * (64 / 255) ** 0.5))
  t = transforms.TrainTransform((8, 8), ident, hue=0.5)
  red = np.zeros((8, 8, 3), np.uint8)
  red[..., 0] = 200
  hues = {tuple(t({'image': red, 'label': label}, np.random.default_rng(s))['image'][0, 0])
          for s in range(6)}
  assert len(hues) == 6


# --- normalisation -----------------------------------------------------------------------------


def test_normalization_presets():
  image, _ = coupled_pair(4, 5)
  imagenet = transforms.NORMALIZATIONS['imagenet']
  np.testing.assert_allclose(imagenet(image), (image / 255.0 - [0.485, 0.456, 0.406]) /
                             [0.229, 0.224, 0.225], rtol=1e-5, atol=1e-5)
  caffe = transforms.NORMALIZATIONS['caffe_bgr']
  out = caffe(image)
  # BGR order, mean subtracted, no scaling.
  np.testing.assert_allclose(out, image[..., ::-1] - np.array([103.939, 116.779, 123.68]),
                             rtol=1e-6, atol=1e-4)
  assert caffe.rgb_mean == (123.68, 116.779, 103.939)
  for norm in (imagenet, caffe):
    np.testing.assert_array_equal(norm.invert(norm(image)), image)
    np.testing.assert_allclose(norm(np.asarray(norm.rgb_mean, np.float32)), 0, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), ch=st.integers(1, 30), cw=st.integers(1, 30),
       lo=st.floats(0.2, 2.5), seed=st.integers(0, 2**31))
def test_fused_scale_crop_equals_scale_then_crop(h, w, ch, cw, lo, seed):
  image, label = coupled_pair(h, w, seed % 1000)
  scales = (lo, lo * 1.3)
  rng_a, rng_b = np.random.default_rng(seed), np.random.default_rng(seed)
  im_a, lb_a = transforms.random_crop(*transforms.random_scale(image, label, rng_a, scales),
                                      rng_a, (ch, cw), image_fill=(1, 2, 3))
  im_b, lb_b = transforms.random_scale_crop(image, label, rng_b, scales, (ch, cw),
                                            image_fill=(1, 2, 3))
  np.testing.assert_array_equal(lb_b, lb_a)
  assert im_b.shape == im_a.shape and im_b.dtype == np.uint8
  # Resampling only the crop's box rounds a few pixels differently from
  # resampling the whole image (hypothesis found 2 levels at scale 2).
  diff = np.abs(im_b.astype(int) - im_a)
  assert diff.max() <= 2
  assert rng_a.random() == rng_b.random()  # Same draws consumed.


@pytest.mark.parametrize('name', ['imagenet', 'caffe_bgr'])
def test_normalization_uint8_and_float_inputs_agree(name):
  norm = transforms.NORMALIZATIONS[name]
  image = np.random.default_rng(0).integers(0, 256, (9, 11, 3)).astype(np.uint8)
  image[0, :3] = [[0, 0, 0], [255, 255, 255], [1, 128, 254]]
  fast = norm(image)
  assert fast.dtype == np.float32 and fast.shape == image.shape
  np.testing.assert_array_equal(fast, norm(image.astype(np.float32)))
