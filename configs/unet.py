"""U-Net on CamVid (11 classes, 360x480), with the U-Net paper's optimiser.

    python -m semseg_jax.main --config=configs/unet.py --workdir=runs/unet

Ronneberger et al. (MICCAI 2015) train from scratch with SGD, momentum 0.99,
batch 1 (one large tile), elastic deformations and a pixel-weighted loss; the
paper gives no learning rate (the authors' Caffe solver: 1e-2 on a *summed*
loss would be far too large for our mean loss: we use 1e-2 on the mean, poly
decay) and no CamVid recipe. pytorch-semseg has no U-Net config either, so the
data side follows configs/segnet.py (whole 360x480 frames) with flips and
scale augmentation, which stand in for the elastic deformations we do not
have. `padding='same'` (any size, logits at input size) is our default;
upstream's valid convolutions are `--config.model.padding=valid` (only
H, W = 12 mod 16 and >= 188; output 184 px smaller) or 'tile' (the paper's
overlap-tile strategy with the same weights).
"""
import ml_collections

from configs import datasets
from configs import default


def get_config():
  config = default.get_config()
  config.model = ml_collections.ConfigDict()
  config.model.name = 'unet'
  config.model.feature_scale = 4  # pytorch-semseg's default: 16..256 channels (1.94M params).
  config.model.is_deconv = True  # Learned 2x2 up-convolutions, as the paper.
  config.model.in_channels = 3
  config.model.is_batchnorm = True  # Upstream's default (the paper predates BatchNorm).
  config.model.padding = 'same'  # 'same' | 'valid' (upstream) | 'tile' (paper).
  datasets.camvid(config, crop=(360, 480))  # Whole frames.
  config.dataset.scale_range = (0.75, 1.25)  # Stands in for elastic deformation.
  config.dataset.hflip = True
  config.batch_size = 1  # Paper: one tile per step.
  config.eval_batch_size = 1
  config.num_train_steps = 40_000  # ~110 epochs of CamVid's 367 images.
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 1e-2
  config.optimizer.momentum = 0.99  # Paper: "a high momentum (0.99)".
  config.optimizer.weight_decay = 5e-4
  config.schedule.name = 'poly'
  config.eval_every_steps = 2000
  config.checkpoint_every_steps = 2000
  return config
