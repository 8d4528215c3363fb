"""Quickstart: a small U-Net on the built-in `shapes` data; no download.

    python -m semseg_jax.main --config=configs/quickstart.py --workdir=runs/quickstart

Trains in a few minutes on a 2-core CPU and reaches val mIoU >= 0.80 (measured
figures: experiments/RESULTS.md). The workdir then holds checkpoints/,
metrics.jsonl, TensorBoard events and predictions/ (input | prediction | label).
"""
from configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'unet'
  config.model.feature_scale = 8  # Channels 8, 16, 32, 64, 128.
  config.model.padding = 'same'
  config.num_classes = 6
  config.dataset.name = 'shapes'
  config.dataset.image_size = (128, 128)
  config.dataset.shapes_image_size = (128, 128)
  config.batch_size = 8
  config.eval_batch_size = 20
  config.num_train_steps = 2000
  config.optimizer.name = 'adam'
  config.optimizer.learning_rate = 3e-3
  config.optimizer.weight_decay = 0.0
  config.schedule.name = 'cosine'
  config.schedule.warmup_steps = 50
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  return config
