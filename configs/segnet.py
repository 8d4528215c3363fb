"""SegNet on CamVid (11 classes, 367 train / 101 val / 233 test at 360x480).

    python -m semseg_jax.main --config=configs/segnet.py --workdir=runs/segnet

Recipe of the authors' Caffe SegNet tutorial (alexgkendall/SegNet-Tutorial,
Models/segnet_solver.prototxt + segnet_train.prototxt) for the VGG16-based
SegNet: SGD, momentum 0.9, fixed learning rate 1e-3, weight decay 5e-4,
40,000 iterations, whole 360x480 images without augmentation, the encoder
initialised from ImageNet VGG16, and the loss weighted by median-frequency
balancing (the 11 weights below). The tutorial uses batch 4 "to fit on your
GPU"; the paper (TPAMI 2017, Sec. 3.3) uses mini-batches of 12 and SGD with
a fixed learning rate of 0.1, but that is for its SegNet-Basic decoder study
trained from scratch; with a pretrained encoder we keep the tutorial's 1e-3
and the paper's batch of 12. The network is our default SegNet (ceil-mode
pooling and a plain conv classifier, as the Caffe model), not upstream's.

Initialise the encoder from torchvision VGG16 before training:
``semseg_jax.convert.segnet.init_from_vgg16(params, vgg16_state_dict)``.
Build the ``camvid`` TFDS dataset first (README, "Datasets").
"""
import ml_collections

from configs import datasets
from configs import default


def get_config():
  config = default.get_config()
  config.model = ml_collections.ConfigDict()
  config.model.name = 'segnet'
  config.model.in_channels = 3
  config.model.width_mult = 1.0  # 64..512 channels, VGG16's.
  config.model.ceil_mode = True  # Caffe pooling; False = upstream (H, W >= 32).
  config.model.final_bn_relu = False  # True = upstream's BN+ReLU on the scores.
  datasets.camvid(config, crop=(360, 480))  # Whole CamVid frames, no crop.
  config.dataset.scale_range = None  # The tutorial does not augment.
  config.dataset.hflip = False
  config.loss.name = 'cross_entropy'
  # Median-frequency balancing (segnet_train.prototxt), in SegNet's class
  # order: sky, building, pole, road, pavement, tree, sign, fence, car,
  # pedestrian, bicyclist (void = 11 in the tutorial is our ignore label).
  config.loss.class_weights = (0.2595, 0.1826, 4.5640, 0.1417, 0.9051, 0.3826,
                               9.6446, 1.8418, 0.6823, 6.2478, 7.3614)
  config.batch_size = 12  # Paper's mini-batch (tutorial: 4).
  config.eval_batch_size = 12
  config.num_train_steps = 40_000  # Tutorial's max_iter.
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 1e-3  # Tutorial's base_lr.
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.schedule.name = 'constant'  # Tutorial: lr_policy step with gamma 1.
  config.log_every_steps = 50
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000
  return config
