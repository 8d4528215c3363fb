"""FCN-32s on Pascal VOC 2012, with FCN-8s's recipe (see configs/fcn8s.py).

    python -m semseg_jax.main --config=configs/fcn32s.py --workdir=runs/fcn32s

pytorch-semseg trains all three FCNs with the same settings (batch 1, SGD
momentum 0.99, lr 1e-10 on the summed loss); so do we, mean-normalised.
"""
from configs import fcn8s


def get_config():
  config = fcn8s.get_config()
  config.model.name = 'fcn32s'
  return config
