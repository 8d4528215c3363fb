"""Per-dataset defaults that network configs reuse: name, splits, classes, crop, eval size.

Each function sets the dataset facts of ``config`` in place and returns it;
the network config then sets its recipe (augmentation, optimiser) on top::

  from configs import datasets
  config = datasets.voc(default.get_config(), crop=(473, 473))

Augmentation strengths are left to the network config: they are part of a
paper's recipe, not of the dataset. Evaluation sees every pixel: VOC,
Cityscapes and CamVid are padded to their largest image, which the pipeline
knows (``pipeline.KNOWN_MAX_SIZES``, the one table of those sizes); ADE20K's
sizes are unbounded, so its preset sets ``eval_pad_size`` itself.
``normalization='caffe_bgr'`` is for weights converted from Caffe (PSPNet,
ICNet); networks trained here or from torchvision weights use 'imagenet'.
``resize=(H, W)`` trains and evaluates on every image resized to that size
(pytorch-semseg's ``img_size``; e.g. ENet's half-size Cityscapes): metrics
are then at that size, and ``crop`` is usually the same.

(A package rather than ``configs/datasets.py`` because every ``configs/*.py``
is a runnable ``get_config`` file.)
"""
import ml_collections

Size = tuple[int, int]


def _set(config: ml_collections.ConfigDict, *, name: str, num_classes: int, crop: Size,
         train_split: str, eval_split: str, normalization: str,
         resize: Size | None, eval_pad_size: Size | None = None,
         eval_shrink_to_fit: bool = False) -> ml_collections.ConfigDict:
  crop = tuple(int(v) for v in crop)
  if len(crop) != 2 or min(crop) < 1:
    raise ValueError(f'{name} preset: crop must be (H, W) positive ints, got {crop!r}')
  d = config.dataset
  d.name = name
  d.train_split = train_split
  d.eval_split = eval_split
  d.image_size = crop
  d.resize = None if resize is None else tuple(int(v) for v in resize)
  # With `resize`, every image (train and eval) has that size: evaluate at it.
  d.eval_pad_size = eval_pad_size if resize is None else None
  d.eval_shrink_to_fit = eval_shrink_to_fit
  d.normalization = normalization
  d.mean = None  # Only 'custom' normalisation reads these.
  d.std = None
  config.num_classes = num_classes
  return config


def voc(config: ml_collections.ConfigDict, crop: Size = (512, 512), *,
        train_split: str = 'train_aug', normalization: str = 'imagenet',
        resize: Size | None = None) -> ml_collections.ConfigDict:
  """Pascal VOC 2012: 21 classes; train on train_aug (VOC + SBD, 10,582 images).

  Images are at most 500x500, so eval pads to 512x512 without resizing.
  """
  return _set(config, name='voc2012', num_classes=21, crop=crop,
              train_split=train_split, eval_split='validation', normalization=normalization,
              resize=resize)


def cityscapes(config: ml_collections.ConfigDict, crop: Size = (512, 1024), *,
               normalization: str = 'imagenet',
               resize: Size | None = None) -> ml_collections.ConfigDict:
  """Cityscapes fine: 19 train ids; 1024x2048 frames evaluated whole.

  ``crop``: 512x1024 (default) or 769x769 (DeepLab) / 713x713 (PSPNet).
  """
  return _set(config, name='cityscapes', num_classes=19, crop=crop,
              train_split='train', eval_split='validation', normalization=normalization,
              resize=resize)


def camvid(config: ml_collections.ConfigDict, crop: Size = (360, 480), *,
           normalization: str = 'imagenet',
           resize: Size | None = None) -> ml_collections.ConfigDict:
  """CamVid (SegNet's 11-class 360x480 version): whole frames by default."""
  return _set(config, name='camvid', num_classes=11, crop=crop,
              train_split='train', eval_split='validation', normalization=normalization,
              resize=resize)


def ade20k(config: ml_collections.ConfigDict, crop: Size = (512, 512), *,
           normalization: str = 'imagenet',
           resize: Size | None = None) -> ml_collections.ConfigDict:
  """ADE20K (SceneParsing, 150 classes); eval pads to 704x704.

  Image sizes vary and are unbounded, so the pad size is a choice (704x704,
  not fitted to the size distribution, which was not measured here): larger
  images are shrunk to fit, keeping their aspect (``eval_shrink_to_fit``),
  and their metrics are at that reduced resolution.
  """
  return _set(config, name='ade20k', num_classes=150, crop=crop, eval_pad_size=(704, 704),
              train_split='train', eval_split='validation', normalization=normalization,
              resize=resize, eval_shrink_to_fit=True)


PRESETS = {'voc': voc, 'cityscapes': cityscapes, 'camvid': camvid, 'ade20k': ade20k}
