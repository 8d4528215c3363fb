"""DeepLabV3+ with ResNet-101 on Pascal VOC 2012 (default) or Cityscapes.

    python -m semseg_jax.main --config=configs/deeplabv3plus.py --workdir=runs/deeplabv3plus
    python -m semseg_jax.main --config=configs/deeplabv3plus.py:cityscapes \
        --workdir=runs/deeplabv3plus_cityscapes

VOC follows the paper (arXiv 1802.02611, Sec. 4) and DeepLabV3 (arXiv
1706.05587, Sec. 4): train_aug (VOC train + SBD, 10,582 images), output
stride 16, 513x513 crops, random scale 0.5-2.0 and left-right flips, batch
16 with BatchNorm trained, SGD momentum 0.9, learning rate 0.007 with poly
decay (power 0.9) to 0 over 30k iterations. Weight decay 1e-4: the TF
reference (tensorflow/models research/deeplab train.py) uses 4e-5 for
Xception/MobileNet and says 1e-4 for ResNet backbones. The paper then
fine-tunes at output stride 8 with frozen BatchNorm on VOC trainval (lr 0.001,
30k steps): rerun with `--config.model.output_stride=8
--config.model.freeze_bn=True --config.optimizer.learning_rate=0.001`; and it
evaluates at output stride 8, which the same variables support
(`--mode=eval --config=... --config.model.output_stride=8`).

Cityscapes (`:cityscapes`): TF reference g3doc/cityscapes.md: train_fine
(2,975 images), output stride 16, 769x769 crops, 90k iterations, batch > 8
with BatchNorm trained; learning rate 0.01 (poly 0.9), weight decay 1e-4.
The in-training evaluation pads/shrinks images to the 769x769 crop size;
report full-resolution numbers with `--mode=eval
--config.dataset.image_size=1024,2048`.

The paper starts from an ImageNet-pretrained backbone (VOC: also COCO); the
ResNet lives under params['backbone'] in torchvision's layout
(semseg_jax.convert.resnet). BatchNorm momentum is PyTorch's 0.1 where the TF
reference uses decay 0.9997.

Datasets: build `voc2012` / `cityscapes` with TFDS first (README, "Datasets").
"""
import ml_collections
from ml_collections import config_dict

from configs import datasets
from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None or 'voc' (default), or 'cityscapes'."""
  dataset = arg or 'voc'
  if dataset not in ('voc', 'cityscapes'):
    raise ValueError(f"configs/deeplabv3plus.py takes 'voc' or 'cityscapes', got {arg!r}")
  config = default.get_config()
  config.model = ml_collections.ConfigDict({
      'name': 'deeplabv3plus',
      'resnet_depth': 101,  # Paper's ResNet variant; 50 and 152 also available.
      'output_stride': 16,  # Training setting; evaluate at 8 with the same variables.
      'atrous_rates': config_dict.placeholder(tuple),  # None = (6, 12, 18) * 16 / output_stride.
      'multi_grid': config_dict.placeholder(tuple),  # e.g. (1, 2, 4) (DeepLabV3); None = off.
      'dropout_rate': 0.1,  # After the ASPP projection (TF reference: keep_prob 0.9).
      'freeze_bn': False,  # True for the output-stride-8 fine-tuning stage / small batches.
      'width_mult': 1.0,  # Paper widths (ASPP 256, low-level 48, decoder 256).
  })
  config.loss.aux_weights = ()  # No auxiliary outputs.
  config.batch_size = 16  # Paper: 16, BatchNorm trained.
  config.optimizer.name = 'sgd'
  config.optimizer.momentum = 0.9  # Paper: momentum 0.9.
  config.optimizer.nesterov = False
  config.optimizer.weight_decay = 1e-4  # TF reference: 1e-4 for ResNet backbones.
  config.schedule.name = 'poly'  # Paper: lr * (1 - t/T) ** 0.9, decaying to 0.
  config.schedule.power = 0.9
  config.schedule.end_lr_factor = 0.0
  config.schedule.warmup_steps = 0  # Paper: none.
  config.log_every_steps = 50
  config.eval_every_steps = 2000
  config.checkpoint_every_steps = 2000
  config.dataset.hflip = True  # Paper: random left-right flips.
  config.dataset.scale_range = (0.5, 2.0)  # Paper: random scale 0.5-2.0.
  if dataset == 'voc':
    # train_aug (VOC + SBD, 10,582), validation 1,449 padded to 512x512; paper's crop 513.
    datasets.voc(config, crop=(513, 513))
    config.optimizer.learning_rate = 0.007  # Paper: 0.007.
    config.num_train_steps = 30_000  # Paper: 30k iterations on train_aug.
    config.eval_batch_size = 16
  else:
    # train_fine 2,975 / validation 500 at 1024x2048; TF reference train_crop_size 769.
    datasets.cityscapes(config, crop=(769, 769))
    config.optimizer.learning_rate = 0.01
    config.num_train_steps = 90_000  # TF reference: 90k iterations.
    config.eval_batch_size = 8
    config.eval_every_steps = 5000
    config.checkpoint_every_steps = 5000
  return config
