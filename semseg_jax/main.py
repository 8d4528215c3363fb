"""Command line: train, evaluate or predict with a config file.

    python -m semseg_jax.main --config=configs/quickstart.py --workdir=/tmp/qs
    python -m semseg_jax.main --config=configs/fcn8s.py --workdir=DIR --config.batch_size=16
    python -m semseg_jax.main --workdir=DIR --mode=eval            # config from DIR/config.json
    python -m semseg_jax.main --workdir=DIR --mode=predict --input='imgs/*.jpg' --output=out/
    python -m semseg_jax.main --workdir=DIR --mode=export --export_format=onnx
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from semseg_jax import config as config_lib
from semseg_jax import cpu_malloc
from semseg_jax import data as data_lib
from semseg_jax import evaluate
from semseg_jax import export
from semseg_jax import inference
from semseg_jax import sharding
from semseg_jax import train
from semseg_jax import writers

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Config file (configs/*.py); --config.KEY=VALUE overrides a field.',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, events, predictions.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict', 'export'], 'What to do.')
flags.DEFINE_string('input', None, 'predict: an image, a directory or a glob.')
flags.DEFINE_string('output', None, 'predict: output directory (default WORKDIR/predictions).')
flags.DEFINE_string('labels', None,
                    "predict: optional ground-truth pattern, e.g. 'gt/{stem}.png'.")
flags.DEFINE_enum('export_format', 'stablehlo', list(export.FORMATS),
                  'export: jax.export StableHLO, ONNX ([onnx] extra) or TF SavedModel ([tf]).')
flags.DEFINE_string('export_dir', None, 'export: output directory (default WORKDIR/export/FORMAT).')
flags.DEFINE_string('export_batch', 'polymorphic', "export: 'polymorphic' or a fixed batch N.")
flags.DEFINE_string('export_size', None,
                    "export: 'H,W', or 'polymorphic' (any multiple of 32 where the network "
                    'allows); default config.dataset.image_size.')
flags.DEFINE_enum('export_output', 'logits', list(export.OUTPUTS),
                  'export: normalised float32 image -> logits, or uint8 image -> uint8 labels.')
flags.DEFINE_bool('tune_cpu_malloc', True,
                  "glibc, when JAX runs on the CPU: keep XLA:CPU's per-step buffers mapped "
                  'between steps instead of page-faulting them in afresh '
                  '(semseg_jax/cpu_malloc.py).')

# Errors that are the user's to fix: reported in one line, without a traceback.
# A non-finite loss (FloatingPointError) names its step; the last good checkpoint stays.
_USER_ERRORS = (config_lib.ConfigError, data_lib.DatasetNotFoundError, FileNotFoundError,
                OSError, export.ExportError, data_lib.BadInputError, FloatingPointError)


def _config():
  if FLAGS.config is not None:
    return FLAGS.config
  if FLAGS.mode != 'train' and FLAGS.workdir:
    return train.load_config_from_workdir(FLAGS.workdir)
  raise config_lib.ConfigError('--config is required (e.g. --config=configs/quickstart.py)')


def run(mode: str) -> None:
  config = _config()
  config_lib.validate_config(config)
  workdir = FLAGS.workdir
  if workdir is None:
    raise config_lib.ConfigError('--workdir is required')
  if mode == 'train':
    scores = train.train_and_evaluate(config, workdir)
    info = train.check_dataset(config)
    if jax.process_index() == 0:
      print(evaluate.write_report(scores, info.class_names, workdir, 'final_eval'))
  elif mode == 'eval':
    info = train.check_dataset(config)
    mesh = sharding.create_mesh()
    model, variables, step = train.restore_variables(config, workdir, config.eval_checkpoint,
                                                     mesh)
    scores = evaluate.Evaluator(config, model, mesh, info).evaluate(variables, step=step)
    if jax.process_index() == 0:
      print(f'{config.eval_checkpoint} checkpoint, step {step}, split '
            f'{config.dataset.eval_split!r}:')
      print(evaluate.write_report(scores, info.class_names, workdir, f'eval_step_{step}'))
      with writers.TensorBoardWriter(workdir) as writer:
        evaluate.log_scores(writer, step, scores, info.class_names)
  elif mode == 'predict':
    if not FLAGS.input:
      raise config_lib.ConfigError('--mode=predict needs --input=PATH_OR_GLOB')
    info = data_lib.get_dataset_info(config.dataset.name, data_dir=config.dataset.data_dir)
    model, variables, _ = train.restore_variables(config, workdir, config.eval_checkpoint)
    predictor = inference.Predictor.from_config(config, model, variables)
    output = FLAGS.output or os.path.join(workdir, 'predictions')
    written = inference.predict_files(FLAGS.input, output, predictor, info.palette,
                                      FLAGS.labels)
    print(f'wrote {len(written)} predictions to {output}')
  elif mode == 'export':
    out_dir = FLAGS.export_dir or os.path.join(workdir, 'export', FLAGS.export_format)
    meta = export.export_workdir(config, workdir, fmt=FLAGS.export_format, out_dir=out_dir,
                                 batch=FLAGS.export_batch, size=FLAGS.export_size,
                                 output=FLAGS.export_output)
    if meta.get('note'):
      print(f'note: {meta["note"]}')
    check = (f', reloaded max |diff| {meta["max_abs_diff"]:.2e}'
             if meta['output'] == 'logits' and 'max_abs_diff' in meta else '')
    print(f'exported {meta["model"]} step {meta["checkpoint"]["step"]} to '
          f'{os.path.join(out_dir, meta["artifact"])} (input {meta["input"]["dtype"]} '
          f'{meta["input"]["shape"]}){check}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.tune_cpu_malloc and cpu_malloc.cpu_backend_expected():
    # Before JAX starts its backends (cpu_malloc's docstring).
    logging.info('glibc malloc tuned for XLA:CPU: %s', cpu_malloc.tune_cpu_malloc())
  sharding.initialize_distributed()
  logging.info('process %d of %d, devices: %s', jax.process_index(), jax.process_count(),
               jax.devices())
  try:
    run(FLAGS.mode)
  except _USER_ERRORS as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
