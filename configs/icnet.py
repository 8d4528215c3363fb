"""ICNet (with BatchNorm) on Cityscapes (19 classes).

    python -m semseg_jax.main --config=configs/icnet.py --workdir=runs/icnet
    python -m semseg_jax.main --config=configs/icnet.py:merged --workdir=runs/icnet_nobn

Recipe of the ICNet paper (Zhao et al., ECCV 2018, "Implementation
details"), trained like PSPNet in the authors' Caffe code: SGD with batch
16, momentum 0.9 and weight decay 1e-4; "poly" learning rate 0.01 * (1 -
t/T) ** 0.9; 30k iterations (the released ``icnet_cityscapes_train_30k``);
random mirror and random resize 0.5-2.0; loss weights 1 (1/4 output), 0.4
(1/8) and 0.16 (1/16) — pytorch-semseg's ``multi_scale_cross_entropy2d``
weights 0.4 ** i, here ``loss.aux_weights = (0.4, 0.16)`` on the model's
(1/8, 1/16) auxiliary logits. The crop size is not given in the paper; we
use the authors' PSPNet Cityscapes crop, 713x713 (the network works at any
size). Not reproduced: the paper initialises from a trained PSPNet50 and
then prunes every layer to half its kernels (the network here is the
pruned width, trained from scratch unless weights are converted with
``semseg_jax.convert.from_ptsemseg(sd, 'icnetBN')``).

``:merged`` trains ``icnet``, the variant without BatchNorm (biased convs)
into which the released ``icnet_cityscapes_*`` Caffe models fold their
BatchNorm; it suits fine-tuning those weights, not training from scratch.

Report full-resolution numbers with ``--mode=eval
--config.dataset.image_size=1024,2048`` (the in-training evaluation
pads/shrinks to the crop). Build the ``cityscapes`` TFDS dataset first
(README, "Datasets").
"""
import ml_collections

from configs import datasets
from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None (ICNet with BatchNorm) or 'merged' (without BatchNorm)."""
  if arg not in (None, 'bn', 'merged'):
    raise ValueError(f"configs/icnet.py takes 'bn' (default) or 'merged', got {arg!r}")
  merged = arg == 'merged'
  config = default.get_config()
  config.model = ml_collections.ConfigDict({
      'name': 'icnet' if merged else 'icnetBN',
      'is_batchnorm': not merged,  # BatchNorm after every conv (paper: yes).
      'block_config': (3, 4, 6, 3),  # ResNet-50 stages at half width.
      'bins': (6, 3, 2, 1),  # Pyramid levels, summed into the 1/32 features.
      'pool_mode': 'adaptive',  # 'floor' / 'upstream' = pytorch-semseg's pooling.
      'unused_pool_convs': True,  # Upstream's dead pyramid convs (params only).
      'repeat_res3_identity': False,  # True = upstream's extra BN-stat pass.
      'width_mult': 1.0,  # The paper's (pruned) widths.
  })
  config.loss.aux_weights = (0.4, 0.16)  # Paper: 1 / 0.4 / 0.16 for 1/4, 1/8, 1/16.
  # train_fine 2,975 / validation 500, evaluated at 1024x2048. Crop 713 (not in the paper;
  # PSPNet's). Weights converted from the authors' Caffe model want normalization='caffe_bgr'.
  datasets.cityscapes(config, crop=(713, 713))
  config.dataset.scale_range = (0.5, 2.0)  # Paper: random resize 0.5-2.
  config.dataset.hflip = True  # Paper: random mirror.
  config.batch_size = 16  # Paper: 16.
  config.eval_batch_size = 8
  config.num_train_steps = 30_000  # Paper / released model: 30k iterations.
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.01  # Paper: base lr 0.01.
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = False
  config.optimizer.weight_decay = 1e-4  # Paper: 0.0001.
  config.schedule.name = 'poly'  # Paper: power 0.9.
  config.schedule.power = 0.9
  config.schedule.end_lr_factor = 0.0
  config.schedule.warmup_steps = 0
  config.log_every_steps = 50
  config.eval_every_steps = 2000
  config.checkpoint_every_steps = 2000
  return config
