"""G-FRNet (Gated Feedback Refinement Network) on CamVid (default) or VOC 2012.

    python -m semseg_jax.main --config=configs/gfrnet.py --workdir=runs/gfrnet
    python -m semseg_jax.main --config=configs/gfrnet.py:voc --workdir=runs/gfrnet_voc

CamVid follows the authors' released Caffe setup (github.com/mrochan/gfrnet:
models/camvid/{train,solver}_camvid_gate.prototxt): the 11-class CamVid of
SegNet (367 train / 233 test images, 360x480, class 11 'void' ignored), whole
images without augmentation, batch 6, SGD lr 1e-3 momentum 0.9 weight decay
5e-4 for 150k iterations, median-frequency class weights, and the six stage
losses summed with weight 1. The released solver drops the learning rate
x0.1 every 50k steps, and so do we. The paper initialises the encoder from ImageNet VGG16.

VOC (`:voc`): the paper reports VOC 2012 results but the authors released no
VOC recipe; we keep the CamVid solver and add the usual VOC augmentation
(train_aug, random scale 0.5-2, flips, 512x512 crops padded with 'ignore', so
evaluation sees whole images at full resolution) - our choice, not the paper's.

Dataset: build `camvid` / `voc2012` with TFDS first (README, "Datasets").
"""
import ml_collections

from configs import datasets
from configs import default

# Median-frequency weights of the released prototxt (SegNet's CamVid order:
# sky, building, pole, road, pavement, tree, sign, fence, car, pedestrian,
# bicyclist).
_CAMVID_CLASS_WEIGHTS = (0.2595, 0.1826, 4.5640, 0.1417, 0.9051, 0.3826,
                         9.6446, 1.8418, 0.6823, 6.2478, 7.3614)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None or 'camvid' (default), or 'voc'."""
  dataset = arg or 'camvid'
  if dataset not in ('camvid', 'voc'):
    raise ValueError(f"configs/gfrnet.py takes 'camvid' or 'voc', got {arg!r}")
  config = default.get_config()
  config.model = ml_collections.ConfigDict({
      'name': 'gfrnet',
      'variant': 'caffe',  # Authors' released network; 'paper': the paper's text.
      'width_mult': 1.0,  # VGG16 widths.
      'encoder_norm': True,  # BatchNorm after every encoder conv (released net).
      'dropout_rate': 0.5,  # After pool3/4/5 and conv6/7 (released net).
  })
  # Stage-wise supervision: pred_1 ... pred_5 (1/32 ... 1/2), each weight 1.
  config.loss.aux_weights = (1.0, 1.0, 1.0, 1.0, 1.0)
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 1e-3  # Released solver: base_lr 0.001.
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.schedule.name = 'step'  # Released solver: x0.1 every 50k steps.
  config.schedule.boundaries = (50_000, 100_000)
  config.schedule.decay_factor = 0.1
  config.num_train_steps = 150_000  # Released solver: max_iter 150k.
  config.batch_size = 6  # Released train prototxt: batch_size 6.
  config.log_every_steps = 50
  config.eval_every_steps = 5000
  config.checkpoint_every_steps = 5000
  if dataset == 'camvid':
    datasets.camvid(config, crop=(360, 480))  # Whole images, no crop; 367 train images.
    config.dataset.eval_split = 'test'  # 233 images, as the paper reports.
    config.dataset.scale_range = None  # Released data layer: no augmentation.
    config.dataset.hflip = False
    config.loss.class_weights = _CAMVID_CLASS_WEIGHTS  # Released prototxt.
    config.eval_batch_size = 6
  else:
    datasets.voc(config, crop=(512, 512))  # train_aug; VOC is <= 500x500: eval pads.
    config.dataset.scale_range = (0.5, 2.0)  # Our choice.
    config.dataset.hflip = True
    config.eval_batch_size = 6
  return config
