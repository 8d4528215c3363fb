"""FCN-8s on Pascal VOC 2012 (train_aug = VOC train + SBD, 10,582 images).

    python -m semseg_jax.main --config=configs/fcn8s.py --workdir=runs/fcn8s

Hyper-parameters follow the FCN paper's "at-once" FCN-8s and pytorch-semseg's
configs/fcn8s_pascal.yml: batch 1, SGD with momentum 0.99, 300k iterations,
lr 1e-10 and weight decay 5e-4 on a *summed* pixel loss. Our loss is the mean
over valid pixels, so the same update needs the learning rate multiplied by the
pixels per image (~500x375 = 187,500 on VOC): lr 1e-10 * 187,500 = 1.875e-5,
and the weight decay divided by it: 5e-4 / 187,500 = 2.7e-9 (the decay is
that weak in the original too). Use ImageNet VGG16 weights for the encoder
(semseg_jax.convert.vgg16) as the paper does; from scratch it trains poorly.

Dataset: build `voc2012` with TFDS first (README, "Datasets"); without it the
run stops and says how. On one GPU one step is ~0.1 s; with more devices raise
batch_size to a multiple of their count and scale the learning rate with it.
"""
import ml_collections

from configs import datasets
from configs import default


def get_config():
  config = default.get_config()
  config.model = ml_collections.ConfigDict({'name': 'fcn8s'})
  datasets.voc(config, crop=(512, 512))  # train_aug; VOC images are <= 500x500: pad, never crop.
  config.dataset.scale_range = None
  config.dataset.hflip = True
  config.batch_size = 1
  config.eval_batch_size = 1
  config.num_train_steps = 300_000
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 1.875e-5
  config.optimizer.momentum = 0.99
  config.optimizer.weight_decay = 2.7e-9
  config.schedule.name = 'constant'
  config.log_every_steps = 50
  config.eval_every_steps = 5000
  config.checkpoint_every_steps = 5000
  return config
