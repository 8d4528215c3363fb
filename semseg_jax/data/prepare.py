"""Builds a registered TFDS dataset in ArrayRecord format (no TensorFlow needed).

    python -m semseg_jax.data.prepare --dataset=voc2012 [--manual_dir=DIR] [--data_dir=DIR]
    python -m semseg_jax.data.prepare --dataset=cityscapes --manual_dir=~/cityscapes --skip_bad

Raw files are read from ``--manual_dir`` (archives or extracted folders, see
each builder's module docstring); voc2012 downloads what is not there. Prints
where the dataset went and its split sizes; train with
``--config.dataset.name=NAME --config.dataset.data_dir=DATA_DIR``.
"""
from __future__ import annotations

import sys
from typing import Any

from absl import app
from absl import flags

from semseg_jax import data as data_lib

_DATASET = flags.DEFINE_string('dataset', None, 'Registered dataset name (voc2012, cityscapes, '
                               'camvid, ade20k, ...).')
_MANUAL_DIR = flags.DEFINE_string('manual_dir', None, 'Folder with the raw archives / folders '
                                  '(default: TFDS default, <data_dir>/downloads/manual).')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data_dir to build into '
                                '(default ~/tensorflow_datasets).')
_DOWNLOAD_DIR = flags.DEFINE_string('download_dir', None, 'Where downloads and extracted '
                                    'archives go (default <data_dir>/downloads).')
_SKIP_BAD = flags.DEFINE_bool('skip_bad', False, 'Skip (and count) unreadable or invalid '
                              'examples instead of stopping at the first.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Rebuild even if already prepared.')


def prepare(name: str, *, manual_dir: str | None = None, data_dir: str | None = None,
            download_dir: str | None = None, skip_bad: bool = False,
            overwrite: bool = False) -> Any:
  """Builds dataset ``name`` (ArrayRecord) and returns its prepared TFDS builder.

  The builder's ``skipped`` attribute maps split -> examples skipped (``skip_bad``).

  Raises:
    DatasetNotFoundError: ``name`` is not a registered TFDS dataset.
    FileNotFoundError: expected raw files are missing (all of them are listed).
    BadInputError: a bad image / label, unless ``skip_bad``.
  """
  # Imported here: slow, and only needed to build.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  tfds_name = data_lib._entry(name).tfds_name  # pylint: disable=protected-access
  if tfds_name is None:
    raise data_lib.DatasetNotFoundError(f'dataset {name!r} is built in: nothing to prepare')
  builder = tfds.builder(tfds_name, data_dir=data_dir, skip_bad=skip_bad,
                         file_format='array_record')
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(
      download_dir=download_dir,
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, download_mode=mode))
  return builder


def summary(name: str, builder: Any) -> str:
  """What ``prepare`` did, for people: location, format, split sizes, skips."""
  lines = [f'{name} prepared in {builder.data_dir} ({builder.info.file_format.value})']
  for split, info in sorted(builder.info.splits.items()):
    lines.append(f'  {split}: {info.num_examples} examples')
  skipped = {k: v for k, v in getattr(builder, 'skipped', {}).items() if v}
  if skipped:
    lines.append('skipped bad examples (--skip_bad): ' +
                 ', '.join(f'{k} {v}' for k, v in sorted(skipped.items())))
  data_dir = builder.data_dir.split(f'/{builder.name}/')[0] if builder.data_dir else None
  lines.append(f'train with --config.dataset.name={name} --config.dataset.data_dir={data_dir}')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  from semseg_jax.data.builders import base  # pylint: disable=g-import-not-at-top
  try:
    builder = prepare(_DATASET.value, manual_dir=_MANUAL_DIR.value, data_dir=_DATA_DIR.value,
                      download_dir=_DOWNLOAD_DIR.value, skip_bad=_SKIP_BAD.value,
                      overwrite=_OVERWRITE.value)
  except (data_lib.DatasetNotFoundError, FileNotFoundError, base.BadInputError) as e:
    sys.exit(f'error: {e}')
  print(summary(_DATASET.value, builder))


if __name__ == '__main__':
  flags.mark_flag_as_required('dataset')
  app.run(main)
