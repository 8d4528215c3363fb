"""LinkNet (ResNet-18 encoder) on Cityscapes (default) or CamVid, the paper's protocol.

    # ImageNet ResNet-18 encoder, as the paper (torchvision's resnet18-f37072fd.pth):
    python -m semseg_jax.convert.resnet --config=configs/linknet.py \\
        --checkpoint=resnet18-f37072fd.pth --output=runs/linknet_cityscapes
    python -m semseg_jax.main --config=configs/linknet.py --workdir=runs/linknet_cityscapes
    # CamVid (768x576): the same two commands with --config=configs/linknet.py:camvid

Chaurasia & Culurciello (arXiv 1707.03718) and the authors' code (e-lab/LinkNet
opts.lua / train.lua): whole images downsampled to 1024x512 (Cityscapes) or
768x576 (CamVid), no cropping, batch 8, RMSProp at lr 5e-4 without weight decay,
300 epochs, ENet class weights ``w = 1 / ln(1.02 + p_class)``. RMSProp as
Torch's optim.rmsprop (alpha 0.99, eps 1e-8 outside the root). The network: 11.5M
parameters; 18.9 GFLOPs (XLA count) at 640x360 (paper: 21.2).

Datasets: build `cityscapes` / `camvid` with TFDS first (README, "Datasets").
"""
import ml_collections

from configs import datasets
from configs import default

# name -> (num_classes, image_size (H, W), downscale of the stored images,
#          train images per epoch).
_DATASETS = {
    'cityscapes': (19, (512, 1024), 0.5, 2975),  # 2048x1024 -> 1024x512
    'camvid': (11, (576, 768), 0.8, 367),  # 960x720 -> 768x576
}


def get_config(arg=None):
  """``arg``: 'cityscapes' (default) or 'camvid'."""
  name = arg or 'cityscapes'
  if name not in _DATASETS:
    raise ValueError(f'configs/linknet.py takes one of {sorted(_DATASETS)}, '
                     f'got {name!r}')
  num_classes, image_size, scale, num_train = _DATASETS[name]
  config = default.get_config()
  config.model = ml_collections.ConfigDict({
      'name': 'linknet',
      'encoder_depth': 18,  # Paper: ResNet-18 encoder.
      'width_mult': 1.0,  # Paper widths (64..512, final block 32).
  })
  # Paper: whole images downsampled to `image_size`, no crop, for training and evaluation.
  datasets.PRESETS[name](config, crop=image_size, resize=image_size)
  assert config.num_classes == num_classes
  config.dataset.scale_range = None
  config.dataset.hflip = False  # Paper/authors' code: no augmentation.
  config.loss.class_weights = None  # Paper: ENet's 1/ln(1.02 + p_class); give the K weights here.
  config.batch_size = 8  # Authors' opts.lua.
  config.eval_batch_size = 8
  config.num_train_steps = 300 * num_train // 8  # 300 epochs (authors' maxepoch).
  config.optimizer.name = 'rmsprop'  # Paper: RMSProp.
  config.optimizer.rmsprop_decay = 0.99  # Torch optim.rmsprop's alpha.
  config.optimizer.momentum = 0.0
  config.optimizer.learning_rate = 5e-4  # Paper: 5e-4.
  config.optimizer.weight_decay = 0.0  # Authors' train.lua leaves weight decay out.
  config.schedule.name = 'poly'  # Authors: constant, then a drop after 100 epochs.
  config.log_every_steps = 100
  config.eval_every_steps = 5 * num_train // 8  # Every 5 epochs.
  config.checkpoint_every_steps = 5 * num_train // 8
  return config
