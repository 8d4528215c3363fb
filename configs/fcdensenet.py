"""FC-DenseNet 56 / 67 / 103 ("Tiramisu") on CamVid (11 classes, 360x480).

    python -m semseg_jax.main --config=configs/fcdensenet.py:103 --workdir=runs/fcdensenet103
    python -m semseg_jax.main --config=configs/fcdensenet.py:56 --workdir=runs/fcdensenet56

The argument picks the network (56, 67 or 103; default 103). The recipe is the
paper's (Jegou et al. 2017, Sec. 4) and the authors' config/FC-DenseNet103.py:
from scratch (He-uniform init), 224x224 random crops, batch 3, flips, lr 1e-3
decayed by 0.995 per epoch, weight decay 1e-4, dropout 0.2, up to 750 epochs
with early stopping on validation IoU, then fine-tuning on full 360x480
images at lr 1e-4 (run that second stage with
`--config.dataset.image_size=(360,480) --config.batch_size=1
--config.optimizer.learning_rate=1e-4`, restoring the first stage's weights).

Differences from the paper: Lasagne's RMSprop adds its epsilon inside the
square root, ours outside (PyTorch's placement); no early stopping (keep the
best-mIoU checkpoint: eval_checkpoint=best).

Dataset: build `camvid` with TFDS first (README, "Datasets"); its void label
is 255 (ignored), as the paper ignores void.
"""
import ml_collections

from configs import datasets
from configs import default

# (layers per dense block: down path, bottleneck, up path; growth rate)
_VARIANTS = {
    '56': ((4,) * 11, 12),
    '67': ((5,) * 11, 16),
    '103': ((4, 5, 7, 10, 12, 15, 12, 10, 7, 5, 4), 16),
}
_CAMVID_TRAIN_IMAGES = 367
_BATCH = 3
_EPOCHS = 750


def get_config(arg=None):
  variant = '103' if arg is None else str(arg).removeprefix('fcdensenet')
  if variant not in _VARIANTS:
    raise ValueError(f'configs/fcdensenet.py takes 56, 67 or 103, got {arg!r}')
  blocks, growth = _VARIANTS[variant]
  config = default.get_config()
  config.model = ml_collections.ConfigDict()
  config.model.name = f'fcdensenet{variant}'
  config.model.layers_per_block = blocks  # Layers of the 2 * 5 + 1 dense blocks.
  config.model.growth_rate = growth  # Maps added by each dense layer.
  config.model.first_conv_features = 48  # Maps of the first 3x3 conv.
  config.model.dropout_rate = 0.2  # After every dense / transition-down conv.
  # The paper normalises test batches by their own statistics; running
  # averages make predictions independent of the batch (set True to follow it).
  config.model.batch_stats_at_eval = False
  # 367 train images, 101 validation (the paper early-stops on it), evaluated at 360x480.
  datasets.camvid(config, crop=(224, 224))  # Paper: random 224x224 crops.
  config.dataset.scale_range = None  # Paper: no rescaling.
  config.dataset.hflip = True  # Authors' code: horizontal flips (the paper says "vertical").
  config.dataset.vflip = False
  config.batch_size = _BATCH  # Paper: batch 3 (the authors' config file: 5).
  config.eval_batch_size = 1  # Full 360x480 images, one at a time as in the paper.
  config.num_train_steps = _EPOCHS * -(-_CAMVID_TRAIN_IMAGES // _BATCH)  # 750 epochs = 92,250.
  config.optimizer.name = 'rmsprop'  # Paper: RMSprop (Lasagne defaults: rho 0.9, eps 1e-6).
  config.optimizer.rmsprop_decay = 0.9
  config.optimizer.eps = 1e-6
  config.optimizer.momentum = 0.0
  config.optimizer.learning_rate = 1e-3  # Paper: 1e-3.
  # Paper: loss + 1e-4 * sum(w ** 2) over conv kernels, i.e. a gradient of
  # 2e-4 * w (here applied to biases and BatchNorm parameters too).
  config.optimizer.weight_decay = 2e-4
  config.schedule.name = 'exponential'  # Paper: lr * 0.995 ** epoch.
  config.schedule.warmup_steps = 0
  config.schedule.decay_factor = 0.995
  config.schedule.decay_steps = -(-_CAMVID_TRAIN_IMAGES // _BATCH)  # One epoch.
  config.loss.class_weights = None  # Paper: plain cross-entropy, void ignored.
  config.log_every_steps = 100
  config.eval_every_steps = 10 * -(-_CAMVID_TRAIN_IMAGES // _BATCH)  # Every 10 epochs.
  config.checkpoint_every_steps = config.eval_every_steps
  config.eval_checkpoint = 'best'  # Stands in for the paper's early stopping on val IoU.
  return config
