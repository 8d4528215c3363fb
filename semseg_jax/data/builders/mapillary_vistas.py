"""Mapillary Vistas v1.2 semantic segmentation: 65 evaluated classes.

``manual_dir`` holds the extracted research-edition archive::

  config.json (or config_v1.2.json)       the 66 labels: name, readable, color, evaluate
  training/images/<key>.jpg               18000 images
  training/labels/<key>.png               palette PNGs, index = label id 0..65
      (or training/v1.2/labels/<key>.png, the v2.0-era archive layout)
  validation/images/ ... validation/labels/ ...   2000 images

The label id -> class id table is read from the config at build time: the
labels with ``"evaluate": true`` get class ids ``0..64`` in config order, all
others ("Unlabeled") become 255 = ignore. The config must list the 65
evaluated v1.2 labels in the order of :data:`CLASS_NAMES` (the static
metadata the registry serves without the data); anything else (e.g. the v2.0
config, 124 labels) stops the build with a message naming the file.
Splits: ``train`` (18000), ``validation`` (2000); the test images have no labels.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from semseg_jax import data as data_lib
from semseg_jax.data.builders import base

# The 66 labels of config.json v1.2, in label-id order: (name, RGB colour, evaluated).
LABELS: tuple[tuple[str, tuple[int, int, int], bool], ...] = (
    ('animal--bird', (165, 42, 42), True),
    ('animal--ground-animal', (0, 192, 0), True),
    ('construction--barrier--curb', (196, 196, 196), True),
    ('construction--barrier--fence', (190, 153, 153), True),
    ('construction--barrier--guard-rail', (180, 165, 180), True),
    ('construction--barrier--other-barrier', (90, 120, 150), True),
    ('construction--barrier--wall', (102, 102, 156), True),
    ('construction--flat--bike-lane', (128, 64, 255), True),
    ('construction--flat--crosswalk-plain', (140, 140, 200), True),
    ('construction--flat--curb-cut', (170, 170, 170), True),
    ('construction--flat--parking', (250, 170, 160), True),
    ('construction--flat--pedestrian-area', (96, 96, 96), True),
    ('construction--flat--rail-track', (230, 150, 140), True),
    ('construction--flat--road', (128, 64, 128), True),
    ('construction--flat--service-lane', (110, 110, 110), True),
    ('construction--flat--sidewalk', (244, 35, 232), True),
    ('construction--structure--bridge', (150, 100, 100), True),
    ('construction--structure--building', (70, 70, 70), True),
    ('construction--structure--tunnel', (150, 120, 90), True),
    ('human--person', (220, 20, 60), True),
    ('human--rider--bicyclist', (255, 0, 0), True),
    ('human--rider--motorcyclist', (255, 0, 100), True),
    ('human--rider--other-rider', (255, 0, 200), True),
    ('marking--crosswalk-zebra', (200, 128, 128), True),
    ('marking--general', (255, 255, 255), True),
    ('nature--mountain', (64, 170, 64), True),
    ('nature--sand', (230, 160, 50), True),
    ('nature--sky', (70, 130, 180), True),
    ('nature--snow', (190, 255, 255), True),
    ('nature--terrain', (152, 251, 152), True),
    ('nature--vegetation', (107, 142, 35), True),
    ('nature--water', (0, 170, 30), True),
    ('object--banner', (255, 255, 128), True),
    ('object--bench', (250, 0, 30), True),
    ('object--bike-rack', (100, 140, 180), True),
    ('object--billboard', (220, 220, 220), True),
    ('object--catch-basin', (220, 128, 128), True),
    ('object--cctv-camera', (222, 40, 40), True),
    ('object--fire-hydrant', (100, 170, 30), True),
    ('object--junction-box', (40, 40, 40), True),
    ('object--mailbox', (33, 33, 33), True),
    ('object--manhole', (100, 128, 160), True),
    ('object--phone-booth', (142, 0, 0), True),
    ('object--pothole', (70, 100, 150), True),
    ('object--street-light', (210, 170, 100), True),
    ('object--support--pole', (153, 153, 153), True),
    ('object--support--traffic-sign-frame', (128, 128, 128), True),
    ('object--support--utility-pole', (0, 0, 80), True),
    ('object--traffic-light', (250, 170, 30), True),
    ('object--traffic-sign--back', (192, 192, 192), True),
    ('object--traffic-sign--front', (220, 220, 0), True),
    ('object--trash-can', (140, 140, 20), True),
    ('object--vehicle--bicycle', (119, 11, 32), True),
    ('object--vehicle--boat', (150, 0, 255), True),
    ('object--vehicle--bus', (0, 60, 100), True),
    ('object--vehicle--car', (0, 0, 142), True),
    ('object--vehicle--caravan', (0, 0, 90), True),
    ('object--vehicle--motorcycle', (0, 0, 230), True),
    ('object--vehicle--on-rails', (0, 80, 100), True),
    ('object--vehicle--other-vehicle', (128, 64, 64), True),
    ('object--vehicle--trailer', (0, 0, 110), True),
    ('object--vehicle--truck', (0, 0, 70), True),
    ('object--vehicle--wheeled-slow', (0, 0, 192), True),
    ('void--car-mount', (32, 32, 32), True),
    ('void--ego-vehicle', (120, 10, 10), True),
    ('void--unlabeled', (0, 0, 0), False),
)
CLASS_NAMES = tuple(name for name, _, evaluate in LABELS if evaluate)
PALETTE = np.array([colour for _, colour, evaluate in LABELS if evaluate], np.uint8)
assert len(CLASS_NAMES) == 65

_SPLITS = {'train': 'training', 'validation': 'validation'}  # TFDS split -> folder.
_CONFIG_FILES = ('config.json', 'config_v1.2.json')


def label_table(labels: list[dict[str, Any]], where: str) -> np.ndarray:
  """Label id -> class id from config.json's ``labels``: evaluated ones in order, others 255.

  Args:
    labels: the config's ``labels`` list (dicts with ``name`` and ``evaluate``).
    where: the config file, for errors.

  Returns:
    int64 ``[256]``; entries past the config's labels are -1 (invalid).

  Raises:
    base.BadInputError: the evaluated labels are not the 65 of v1.2, in order.
  """
  try:
    evaluated = [str(label['name']) for label in labels if label['evaluate']]
  except (KeyError, TypeError) as e:
    raise base.BadInputError(f'{where}: malformed "labels" entry ({e!r} missing)') from None
  if tuple(evaluated) != CLASS_NAMES:
    diff = next((i for i, (a, b) in enumerate(zip(evaluated, CLASS_NAMES)) if a != b),
                min(len(evaluated), len(CLASS_NAMES)))
    raise base.BadInputError(
        f'{where}: {len(evaluated)} evaluated labels, differing from Mapillary Vistas v1.2 '
        f'(65) at position {diff}; this builder needs the v1.2 config.json')
  if len(labels) > 256:
    raise base.BadInputError(f'{where}: {len(labels)} labels do not fit 8-bit label PNGs')
  table = np.full(256, -1, np.int64)
  ids = iter(range(len(CLASS_NAMES)))
  for label_id, label in enumerate(labels):
    table[label_id] = next(ids) if label['evaluate'] else base.IGNORE
  return table


def read_config(root: str) -> tuple[str, list[dict[str, Any]]]:
  """(path, labels) of the first of config.json / config_v1.2.json in ``root``."""
  for name in _CONFIG_FILES:
    path = os.path.join(root, name)
    if os.path.exists(path):
      try:
        with open(path, encoding='utf-8') as f:
          return path, json.load(f)['labels']
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise base.BadInputError(f'{path}: not a Vistas config with a "labels" list '
                                 f'({type(e).__name__}: {e})') from None
  raise FileNotFoundError(f'missing in manual_dir={root}: {" or ".join(_CONFIG_FILES)}')


def _label_dir(root: str, folder: str) -> str:
  versioned = os.path.join(root, folder, 'v1.2', 'labels')
  return versioned if os.path.isdir(versioned) else os.path.join(root, folder, 'labels')


class MapillaryVistas(base.SegmentationBuilder):
  """Mapillary Vistas v1.2: 18000 train, 2000 validation images, 65 classes."""

  name = 'mapillary_vistas'
  VERSION = tfds.core.Version('1.2.0')
  RELEASE_NOTES = {'1.2.0': 'Vistas v1.2 labels; 65 evaluated classes, Unlabeled -> ignore.'}
  CLASS_NAMES = CLASS_NAMES
  PALETTE = PALETTE
  HOMEPAGE = 'https://www.mapillary.com/dataset/vistas'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Request the research edition at https://www.mapillary.com/dataset/vistas, extract it into
  manual_dir: manual_dir/config.json (v1.2), manual_dir/training/images/*.jpg,
  manual_dir/training/labels/*.png (or training/v1.2/labels/), and the same for validation/.
  """

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = base.require_manual_dir(dl_manager, ['config.json'] + [
        f'{folder}/{kind}' for folder in _SPLITS.values() for kind in ('images', 'labels')])
    base.require_paths(root, [f'{folder}/images' for folder in _SPLITS.values()],
                       f'(see {type(self).__name__}.MANUAL_DOWNLOAD_INSTRUCTIONS)')
    missing = [f'{folder}/labels' for folder in _SPLITS.values()
               if not os.path.isdir(_label_dir(root, folder))]
    if missing:
      raise FileNotFoundError(f'missing in manual_dir={root}: {", ".join(missing)} (or '
                              f'<split>/v1.2/labels)')
    config_path, labels = read_config(root)
    table = label_table(labels, config_path)
    # Names and colours as the config spells them (same classes as the static ones).
    evaluated = [label for label in labels if label['evaluate']]
    self.info.metadata['readable_names'] = [str(l.get('readable', l['name'])) for l in evaluated]
    self.info.metadata['palette'] = [list(map(int, l.get('color', (0, 0, 0))))
                                     for l in evaluated]
    return {split: self._generate_examples(root, folder, split, table)
            for split, folder in _SPLITS.items()}

  def _generate_examples(self, root: str, folder: str, split: str, table: np.ndarray
                         ) -> Iterator[tuple[str, dict]]:
    image_dir, label_dir = os.path.join(root, folder, 'images'), _label_dir(root, folder)
    for name in sorted(os.listdir(image_dir)):
      stem, ext = os.path.splitext(name)
      if ext.lower() not in ('.jpg', '.jpeg', '.png'):
        continue
      image_path, label_path = os.path.join(image_dir, name), os.path.join(label_dir, stem + '.png')
      label = label_path if os.path.exists(label_path) else base.missing_label(image_path,
                                                                               label_path)
      example = self.make_example(image_path, label, f'{folder}/{name}', label_map=table,
                                  split=split)
      if example is not None:
        yield example


data_lib.register_dataset('mapillary_vistas',
                          base.dataset_info('mapillary_vistas', CLASS_NAMES, PALETTE))
