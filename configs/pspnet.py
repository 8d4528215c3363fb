"""PSPNet on Pascal VOC 2012 (default), Cityscapes or ADE20K.

    python -m semseg_jax.main --config=configs/pspnet.py --workdir=runs/pspnet_voc
    python -m semseg_jax.main --config=configs/pspnet.py:cityscapes --workdir=runs/pspnet_cityscapes
    python -m semseg_jax.main --config=configs/pspnet.py:ade20k --workdir=runs/pspnet_ade20k

Recipe of the PSPNet paper (Zhao et al., CVPR 2017, Sec. 4.1) and the
authors' released models (hszhao/PSPNet): deep-stem ResNet-101 (VOC,
Cityscapes) or ResNet-50 (ADE20K) dilated to output stride 8; SGD with
momentum 0.9 and weight decay 1e-4; "poly" learning rate 0.01 * (1 -
t/T) ** 0.9; batch 16 with BatchNorm statistics over the whole batch (a
sharded jax.jit does that over all devices); auxiliary loss on res4 with
weight 0.4; random mirror and random resize 0.5-2.0; crops of 473x473
(VOC, ADE20K) and 713x713 (Cityscapes), the sizes of upstream's
``pspnet_specs``; 30k (VOC), 90k (Cityscapes) and 150k (ADE20K)
iterations. Not reproduced: the paper's random rotation (-10..10 degrees)
and, for VOC, random Gaussian blur, which our transforms do not have; and
its ImageNet-pretrained deep-stem ResNets (they are not torchvision's
ResNets; the authors' PSPNet weights convert with
``semseg_jax.convert.from_ptsemseg(sd, 'pspnet')`` or, from Caffe blobs,
``semseg_jax.convert.pspnet.pspnet_from_caffe``). The paper's best VOC
numbers also pre-train on MS-COCO.

The in-training evaluation pads/shrinks images to the crop size; report
full-resolution numbers with ``--mode=eval`` and
``--config.dataset.image_size=512,512`` (VOC) or ``=1024,2048``
(Cityscapes); the network works at any size (``pool_mode='adaptive'``).
With a per-device batch of 1 and no data parallelism, consider
``--config.model.pool_norm=group`` (see semseg_jax/models/pspnet.py).

Datasets: build ``voc2012`` / ``cityscapes`` / ``ade20k`` with TFDS first
(README, "Datasets").
"""
import ml_collections

from configs import datasets
from configs import default

# dataset -> (TFDS name, classes, ResNet blocks, crop, iterations, train split)
_DATASETS = {
    'voc': ('voc2012', 21, (3, 4, 23, 3), (473, 473), 30_000, 'train_aug'),
    'cityscapes': ('cityscapes', 19, (3, 4, 23, 3), (713, 713), 90_000, 'train'),
    'ade20k': ('ade20k', 150, (3, 4, 6, 3), (473, 473), 150_000, 'train'),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None or 'voc' (default), 'cityscapes' or 'ade20k'."""
  dataset = arg or 'voc'
  if dataset not in _DATASETS:
    raise ValueError(f'configs/pspnet.py takes one of {sorted(_DATASETS)}, '
                     f'got {arg!r} (--config=configs/pspnet.py:cityscapes)')
  name, num_classes, blocks, crop, steps, train_split = _DATASETS[dataset]
  config = default.get_config()
  config.model = ml_collections.ConfigDict({
      'name': 'pspnet',
      'block_config': blocks,  # ResNet-101 (3, 4, 23, 3) / ResNet-50 (3, 4, 6, 3).
      'bins': (6, 3, 2, 1),  # Paper's pyramid levels.
      'pool_mode': 'adaptive',  # 'floor' = upstream's int(n / bin) pooling.
      'pool_norm': 'batch',  # Paper; 'group' / 'none' for batch-1 training.
      'dropout_rate': 0.1,  # Paper's Dropout2d before both classifiers.
      'width_mult': 1.0,  # Paper widths (2048 at res5, 512 per pyramid branch).
  })
  config.loss.aux_weights = (0.4,)  # Paper: auxiliary loss weight 0.4 on res4.
  # Paper / upstream input_size 473 or 713; VOC trains on train_aug (VOC + SBD, 10,582).
  # Weights converted from the authors' Caffe model want normalization='caffe_bgr'.
  datasets.PRESETS[dataset](config, crop=crop)
  assert (config.dataset.name, config.num_classes, config.dataset.train_split) == (
      name, num_classes, train_split)
  config.dataset.scale_range = (0.5, 2.0)  # Paper: random resize 0.5-2.
  config.dataset.hflip = True  # Paper: random mirror.
  config.batch_size = 16  # Paper: 16, BatchNorm over the whole batch.
  config.eval_batch_size = 8
  config.num_train_steps = steps  # Paper: VOC 30k, Cityscapes 90k, ADE20K 150k.
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.01  # Paper: base lr 0.01.
  config.optimizer.momentum = 0.9  # Paper: 0.9.
  config.optimizer.nesterov = False
  config.optimizer.weight_decay = 1e-4  # Paper: 0.0001.
  config.schedule.name = 'poly'  # Paper: lr * (1 - t/T) ** 0.9.
  config.schedule.power = 0.9
  config.schedule.end_lr_factor = 0.0
  config.schedule.warmup_steps = 0
  config.log_every_steps = 50
  config.eval_every_steps = 5000
  config.checkpoint_every_steps = 5000
  return config
