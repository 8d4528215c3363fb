"""Shared defaults for every semseg-jax run.

Network and dataset configs import this and override a few fields. Every key
here is the one name of its option; an unknown key on the command line
(``--config.foo=1``) is an error.

    python -m semseg_jax.main --config=configs/default.py --workdir=/tmp/run
"""
import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # --- network: `name` picks it from the registry; the other keys are its options.
  config.model = ml_collections.ConfigDict()
  config.model.name = 'unet'
  config.model.feature_scale = 16
  config.model.padding = 'same'
  config.num_classes = 6  # Output classes; must equal the dataset's.
  config.dtype = 'float32'  # Compute dtype: 'float32' or 'bfloat16' (weights stay float32).

  # --- data (semseg_jax/data): the built-in `shapes` needs no download. Per-dataset
  # presets (crops, classes, eval size, normalisation) are in configs/datasets.py.
  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = 'shapes'  # 'shapes' or a prepared TFDS name ('voc2012', ...).
  config.dataset.data_dir = config_dict.placeholder(str)  # TFDS data_dir; None = TFDS default.
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'validation'
  config.dataset.image_size = (128, 128)  # Train crop (H, W), pixels.
  # Training augmentation, applied in this order; None / 0 / False = off.
  config.dataset.resize = config_dict.placeholder(tuple)  # (H, W) for every image, train + eval.
  config.dataset.center_crop = config_dict.placeholder(tuple)  # Train: central (H, W) window.
  config.dataset.scale_range = (0.75, 1.25)  # Random rescale (lo, hi) before the crop.
  config.dataset.rotate = 0.0  # Random rotation, max degrees either way (label nearest, 255).
  config.dataset.translate = 0.0  # Random shift, max fraction of each side.
  config.dataset.hflip = True  # Random horizontal flip.
  config.dataset.vflip = False  # Random vertical flip.
  config.dataset.hue = 0.0  # Random hue shift, max turns in [0, 0.5].
  config.dataset.gamma = config_dict.placeholder(tuple)  # Random gamma range (lo, hi).
  config.dataset.color_jitter = 0.0  # Brightness/contrast/saturation strength in [0, 1).
  # Network input: 'imagenet' (RGB, torchvision mean/std), 'caffe_bgr' (BGR, mean
  # (103.939, 116.779, 123.68), no scaling: converted Caffe PSPNet/ICNet weights) or
  # 'custom' (dataset.mean/std, RGB, 0-255 units; None otherwise).
  config.dataset.normalization = 'imagenet'
  config.dataset.mean = config_dict.placeholder(tuple)
  config.dataset.std = config_dict.placeholder(tuple)
  # Eval keeps full resolution: every image padded (bottom/right, label 255, batch['valid']
  # False) to this (H, W); None = dataset.resize, else the larger of image_size and the
  # dataset's known largest image (pipeline.KNOWN_MAX_SIZES: VOC 512x512, Cityscapes 1024x2048).
  config.dataset.eval_pad_size = config_dict.placeholder(tuple)
  config.dataset.eval_shrink_to_fit = False  # Shrink larger eval images to fit (else error).
  config.dataset.num_workers = 0  # grain worker processes; 0 = read in this process.
  config.dataset.prefetch = 2  # Batches prefetched by the reader threads.
  config.dataset.num_train = 2000  # shapes only: examples in its train split.
  config.dataset.num_eval = 200  # shapes only: examples in its validation split.
  config.dataset.shapes_image_size = (128, 128)  # shapes only: generated image size.

  # --- loss (semseg_jax/losses.py)
  config.loss = ml_collections.ConfigDict()
  config.loss.name = 'cross_entropy'  # or 'bootstrapped_cross_entropy'.
  config.loss.ignore_index = 255
  config.loss.class_weights = config_dict.placeholder(tuple)  # None = uniform.
  config.loss.aux_weights = ()  # One weight per auxiliary output of the network.
  config.loss.bootstrap_k = 4096  # Hardest pixels per image for the bootstrapped loss.

  # --- optimisation
  config.batch_size = 8  # Global batch over all devices and processes.
  config.eval_batch_size = 8  # Global eval batch.
  config.num_train_steps = 2000
  config.seed = 0
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'sgd'  # 'sgd' (momentum), 'adam', 'adamw' or 'rmsprop'.
  config.optimizer.learning_rate = 0.01  # Peak learning rate (after warm-up).
  config.optimizer.momentum = 0.9  # sgd and rmsprop (0 = none).
  config.optimizer.nesterov = False  # sgd only.
  config.optimizer.b1 = 0.9  # adam(w) only.
  config.optimizer.b2 = 0.999  # adam(w) only.
  config.optimizer.rmsprop_decay = 0.99  # rmsprop only: squared-gradient average (torch alpha).
  config.optimizer.eps = 1e-8  # adam(w) and rmsprop: added to the root (PyTorch's placement).
  config.optimizer.weight_decay = 5e-4  # L2 added to the gradient (sgd/adam), decoupled (adamw).
  config.optimizer.grad_clip_norm = 0.0  # Clip the global gradient norm; 0 = off.
  config.schedule = ml_collections.ConfigDict()
  config.schedule.name = 'poly'  # 'poly', 'cosine', 'step', 'exponential' or 'constant'.
  config.schedule.warmup_steps = 0  # Linear warm-up from 0 to the peak.
  config.schedule.power = 0.9  # poly only: lr * (1 - t/T) ** power.
  config.schedule.end_lr_factor = 0.0  # Final lr as a fraction of the peak (poly, cosine).
  config.schedule.boundaries = ()  # step only: steps at which lr is multiplied by decay_factor.
  config.schedule.decay_factor = 0.1  # step: per boundary; exponential: per decay_steps.
  config.schedule.decay_steps = 1000  # exponential only: lr * decay_factor ** (t / decay_steps).

  # --- bookkeeping
  config.log_every_steps = 50
  config.eval_every_steps = 500  # Also evaluates after the last step.
  config.checkpoint_every_steps = 500  # Also saves after the last step.
  config.keep_checkpoints = 3  # Latest checkpoints kept; the best-by-mIoU one is kept too.
  config.eval_checkpoint = 'latest'  # --mode=eval/predict: 'latest' or 'best'.
  config.num_eval_images_logged = 4  # Validation predictions written as images per eval.

  # --- evaluation / inference (semseg_jax/evaluate.py, inference.py)
  config.eval = ml_collections.ConfigDict()
  config.eval.mode = 'whole'  # 'whole' (full image, padded) or 'slide' (windows).
  config.eval.window = config_dict.placeholder(tuple)  # slide: (H, W); None = dataset.image_size.
  config.eval.stride = config_dict.placeholder(tuple)  # slide: (H, W); None = 2/3 of window.
  config.eval.window_batch = 4  # slide: windows run per device call (bounds memory).
  config.eval.scales = (1.0,)  # Multi-scale: probabilities averaged over these image scales.
  config.eval.flip = False  # Also average the horizontally flipped prediction.

  # --- reliability and memory (semseg_jax/train.py)
  config.nan_policy = 'raise'  # Non-finite loss/grad: 'raise' (stop, keep last good) or 'skip'.
  config.preemption_timeout_secs = 60  # SIGTERM: finish step, checkpoint, exit 0 within this.
  config.init_from = config_dict.placeholder(str)  # Workdir/checkpoint whose params start training.
  config.remat = False  # Rematerialise activations per block (jax.checkpoint) to save memory.

  return config
