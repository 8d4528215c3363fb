"""FRRN B (default) or FRRN A on Cityscapes (19 classes).

    python -m semseg_jax.main --config=configs/frrn.py --workdir=runs/frrnB
    python -m semseg_jax.main --config=configs/frrn.py:A --workdir=runs/frrnA

Recipe of the FRRN paper (Pohlen et al., CVPR 2017) as the authors' released
code runs it (TobyPDE/FRRN, train_frrn_a.py / train_frrn_b.py): no
pretraining; FRRN A at quarter resolution (256x512), FRRN B at half
resolution (512x1024); whole subsampled images, batch 3; Adam with learning
rate 1e-3, dropped to 1e-4 after 45k iterations; the bootstrapped
cross-entropy, i.e. the mean of the ``K`` largest pixel losses of each image,
with ``K = 512 * 32 = 16,384`` for A and ``512 * 64 = 32,768`` for B (the
hardest 12.5% / 6.25% of the pixels). Validation runs at the same
subsampled resolution (our eval pipeline shrinks images to
``dataset.image_size``).

Differences: their code trains until stopped by hand (we stop at 90k steps).
They augment with gamma changes (+-0.05)
and translations of up to 20 px, which our pipeline does not have; we use
no augmentation rather than a different one. pytorch-semseg's own
configs/frrnB_cityscapes.yml (SGD, lr 1e-4, momentum 0.99, batch 2, plain
cross-entropy) is not the paper's.

The network is the paper's wiring (``share_pooled_input=False``).
Build the ``cityscapes`` TFDS dataset first (README, "Datasets").
"""
import ml_collections

from configs import datasets
from configs import default

# model type -> (registry name, train/eval size, bootstrap K = 512 * multiplier)
_VARIANTS = {
    'A': ('frrnA', (256, 512), 512 * 32),
    'B': ('frrnB', (512, 1024), 512 * 64),
}


def get_config(arg=None):
  """``arg``: ``'A'`` or ``'B'`` (default ``'B'``)."""
  model_type = 'B' if arg is None else str(arg)
  if model_type not in _VARIANTS:
    raise ValueError(f'configs/frrn.py: unknown model type {model_type!r}; '
                     "use 'A' or 'B' (--config=configs/frrn.py:A)")
  name, size, bootstrap_k = _VARIANTS[model_type]
  config = default.get_config()
  config.model = ml_collections.ConfigDict()
  config.model.name = name
  config.model.group_norm = False  # BatchNorm (paper); True = GroupNorm.
  config.model.n_groups = 16  # GroupNorm groups (upstream's default).
  config.model.share_pooled_input = False  # True = upstream's FRRU wiring.
  config.model.width_mult = 1.0  # Paper widths: 48 base, 32 residual lanes.
  datasets.cityscapes(config, crop=size, resize=size)  # A: 1/4, B: 1/2 of 1024x2048.
  # Fixed subsampling of the 1024x2048 frames.
  config.dataset.scale_range = None  # Every image is resized to `size`.
  config.dataset.hflip = False  # The authors do not flip.
  config.loss.name = 'bootstrapped_cross_entropy'
  config.loss.bootstrap_k = bootstrap_k  # Hardest pixels per image.
  config.batch_size = 3  # Authors' batch.
  config.eval_batch_size = 3
  config.num_train_steps = 90_000  # Twice the iteration of their lr drop.
  config.optimizer.name = 'adam'
  config.optimizer.learning_rate = 1e-3  # Authors' Adam rate.
  config.optimizer.weight_decay = 0.0  # None in the authors' code.
  config.schedule.name = 'step'  # Authors: 1e-3, then 1e-4 after 45k iterations.
  config.schedule.boundaries = (45_000,)
  config.schedule.decay_factor = 0.1
  config.log_every_steps = 50
  config.eval_every_steps = 2500
  config.checkpoint_every_steps = 2500
  return config
