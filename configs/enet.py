"""ENet on Cityscapes (19 classes) at 512x1024, the paper's protocol.

    python -m semseg_jax.main --config=configs/enet.py --workdir=runs/enet

Recipe of the paper (Paszke et al. 2016, Sec. 5) and the authors' Torch code
(e-lab/ENet-training): from scratch, Adam with lr 5e-4 and L2 weight decay
2e-4 added to the gradient (as the trainer's 'adam' does), batch 10, images
downscaled from 1024x2048 to 512x1024 with no other augmentation, and a
class-weighted cross-entropy with w_class = 1 / ln(1.02 + p_class), p_class
the class's share of the training pixels (``enet_class_weights`` below).

The weights are left None (uniform) here: the authors compute p from the
training labels at run time and publish no table. Compute them once from the
prepared dataset and pass them on the command line, e.g.
`--config.loss.class_weights="(2.8, 6.9, ...)"` (19 values).

Differences from the paper: it trains the encoder alone first (on 1/8-size
labels) and then the whole network; here the whole network trains end to end.
The authors' Torch code also divides the lr by 10 every 100 epochs, which the
trainer's schedules cannot express; the paper states a fixed lr, used here.

Dataset: build `cityscapes` with TFDS first (README, "Datasets").
"""
from typing import Sequence

import ml_collections
import numpy as np

from configs import datasets
from configs import default

_CITYSCAPES_TRAIN_IMAGES = 2975
_BATCH = 10
_EPOCHS = 300  # The authors' opts.lua: maxepoch 300.


def enet_class_weights(frequencies: Sequence[float]) -> tuple[float, ...]:
  """ENet's class weights ``1 / ln(1.02 + p)`` from class pixel shares ``p``.

  Args:
    frequencies: ``[K]`` shares of the training pixels per class (ignored
      pixels excluded), each in ``[0, 1]``.

  Returns:
    ``K`` floats in ``(0, 1 / ln(1.02)] = (0, 50.5]``.
  """
  p = np.asarray(frequencies, np.float64)
  if p.ndim != 1 or (p < 0).any() or (p > 1).any():
    raise ValueError(f'enet_class_weights needs class frequencies in [0, 1], '
                     f'got {frequencies!r}')
  return tuple(float(w) for w in 1.0 / np.log(1.02 + p))


def get_config():
  config = default.get_config()
  config.model = ml_collections.ConfigDict()
  config.model.name = 'enet'
  config.model.stage1_dropout_rate = 0.01  # Spatial dropout in bottlenecks 1.x.
  config.model.dropout_rate = 0.1  # Spatial dropout in bottlenecks 2.x and 3.x.
  # Paper: 1024x2048 images downscaled by 2 for training and evaluation (2975 / 500 images).
  datasets.cityscapes(config, crop=(512, 1024), resize=(512, 1024))
  config.dataset.scale_range = None  # The resized image is the crop.
  config.dataset.hflip = False  # Paper / authors' loader: no augmentation.
  config.dataset.vflip = False
  config.loss.class_weights = None  # Paper: 1 / ln(1.02 + p_class); see the docstring.
  config.batch_size = _BATCH  # Paper: 10.
  config.eval_batch_size = _BATCH
  config.num_train_steps = _EPOCHS * (_CITYSCAPES_TRAIN_IMAGES // _BATCH)  # 89,100.
  config.optimizer.name = 'adam'  # Paper: Adam.
  config.optimizer.learning_rate = 5e-4  # Paper: 5e-4.
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.weight_decay = 2e-4  # Paper: L2 2e-4 (added to the gradient).
  config.schedule.name = 'constant'  # Paper: a fixed learning rate.
  config.schedule.warmup_steps = 0
  config.log_every_steps = 100
  config.eval_every_steps = 10 * (_CITYSCAPES_TRAIN_IMAGES // _BATCH)  # Every 10 epochs.
  config.checkpoint_every_steps = config.eval_every_steps
  return config
