"""RefineNet-101 (4-cascaded) on Pascal VOC 2012.

    python -m semseg_jax.main --config=configs/refinenet.py --workdir=runs/refinenet

The recipe is the authors' released training code (guosheng/refinenet,
main/demo_refinenet_train.m and gen_net_opts_model_type*.m): batch 1, SGD
momentum 0.9, weight decay 5e-4, learning rate 5e-4 held constant until the
validation score stops improving, then a second stage at 5e-5 (resume the
same workdir with `--config.optimizer.learning_rate=5e-5
--config.num_train_steps=<more>`; our schedules have no plateau drop), random
scale 0.7-1.3, random crops, left-right flips. The loss is the per-pixel
mean, as theirs. Deviations, all because of our pipeline or trainer:

* crop 512x512 instead of their 400x400: one `image_size` serves as training
  crop and evaluation pad size, and 512 lets evaluation see whole VOC images
  (<= 500x500) unshrunk;
* one learning rate for all parameters (they scale the ResNet's by 0.1);
* `freeze_bn=False`: they freeze the BatchNorm statistics of an
  ImageNet-pretrained ResNet (batch 1). Set it True once the backbone is
  initialised from ImageNet weights (params['backbone'] is torchvision's
  layout, semseg_jax.convert.resnet); from scratch, batch statistics are needed;
* train_aug (VOC train + SBD, 10,582 images), as the paper's VOC results use;
  their demo script trains on the 1,464 VOC train images.

Their example drops the rate after "epoch 70" of 1,000-2,000 sampled images
each (70k-140k steps); 100k steps here.

Dataset: build `voc2012` with TFDS first (README, "Datasets").
"""
import ml_collections

from configs import datasets
from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model = ml_collections.ConfigDict({
      'name': 'refinenet',
      'resnet_depth': 101,  # Paper's main model; 50 and 152 also available.
      'crp_stages': 4,  # Released VOC models: 4 pool+conv stages (training script default: 2).
      'dropout_rate': 0.5,  # On layer4/layer3 and before the classifier (PyTorch port).
      'freeze_bn': False,  # Authors: True with ImageNet weights (see the docstring).
      'width_mult': 1.0,  # Paper widths: 512 (RefineNet-4) and 256.
  })
  config.loss.aux_weights = ()  # No auxiliary outputs.
  # train_aug (VOC + SBD, 10,582), validation 1,449. Authors: 400 crops; ours 512.
  datasets.voc(config, crop=(512, 512))
  config.dataset.scale_range = (0.7, 1.3)  # Authors: scales 0.7:0.1:1.3.
  config.dataset.hflip = True  # Authors: random horizontal flips.
  config.batch_size = 1  # Authors: batch_size 1.
  config.eval_batch_size = 8
  config.num_train_steps = 100_000  # First stage; see the docstring for the second.
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 5e-4  # Authors: 5e-4, then 5e-5.
  config.optimizer.momentum = 0.9  # Authors: 0.9.
  config.optimizer.weight_decay = 5e-4  # Authors: 5e-4.
  config.schedule.name = 'constant'  # Authors: constant, dropped x0.1 by hand at a plateau.
  config.schedule.warmup_steps = 0
  config.log_every_steps = 100
  config.eval_every_steps = 5000
  config.checkpoint_every_steps = 5000
  return config
