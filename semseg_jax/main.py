"""Command line: train, evaluate or predict with a config file.

    python -m semseg_jax.main --config=configs/quickstart.py --workdir=/tmp/qs
    python -m semseg_jax.main --config=configs/fcn8s.py --workdir=DIR --config.batch_size=16
    python -m semseg_jax.main --workdir=DIR --mode=eval            # config from DIR/config.json
    python -m semseg_jax.main --workdir=DIR --mode=predict --input='imgs/*.jpg' --output=out/
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from semseg_jax import config as config_lib
from semseg_jax import data as data_lib
from semseg_jax import evaluate
from semseg_jax import inference
from semseg_jax import sharding
from semseg_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Config file (configs/*.py); --config.KEY=VALUE overrides a field.',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, events, predictions.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict'], 'What to do.')
flags.DEFINE_string('input', None, 'predict: an image, a directory or a glob.')
flags.DEFINE_string('output', None, 'predict: output directory (default WORKDIR/predictions).')
flags.DEFINE_string('labels', None,
                    "predict: optional ground-truth pattern, e.g. 'gt/{stem}.png'.")

# Errors that are the user's to fix: reported in one line, without a traceback.
_USER_ERRORS = (config_lib.ConfigError, data_lib.DatasetNotFoundError, FileNotFoundError,
                OSError)


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
  elif mode == 'predict':
    if not FLAGS.input:
      raise config_lib.ConfigError('--mode=predict needs --input=PATH_OR_GLOB')
    info = data_lib.get_dataset_info(config.dataset.name, data_dir=config.dataset.data_dir)
    model, variables, _ = train.restore_variables(config, workdir, config.eval_checkpoint)
    predictor = inference.Predictor(model, variables, mean=config.dataset.mean,
                                    std=config.dataset.std)
    output = FLAGS.output or os.path.join(workdir, 'predictions')
    written = inference.predict_files(FLAGS.input, output, predictor, info.palette,
                                      FLAGS.labels)
    print(f'wrote {len(written)} predictions to {output}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  sharding.initialize_distributed()
  logging.info('process %d of %d, devices: %s', jax.process_index(), jax.process_count(),
               jax.devices())
  try:
    run(FLAGS.mode)
  except _USER_ERRORS as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
