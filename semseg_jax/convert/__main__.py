"""Convert a pytorch-semseg checkpoint into a semseg-jax workdir.

    python -m semseg_jax.convert --arch=pspnet --checkpoint=pspnet_101_pascal.pth --output=runs/psp
    python -m semseg_jax.main --workdir=runs/psp --mode=eval      # or --mode=predict

The checkpoint may be upstream's training checkpoint (``{"model_state": ...}``)
or a bare state dict, saved as .pth or .pkl; it is read with torch's safe
loader (``weights_only=True``: no pickle code runs). torch is needed only here
(``pip install torch``). The output workdir holds ``checkpoints/0`` (Orbax) and
``config.json``: the network's config file (``configs/<arch>.py`` or
``--config``) with ``config.model`` set to the converted parity-mode network.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from absl import app
from absl import flags
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_string('arch', None, 'Upstream architecture: fcn8s, segnet, pspnet, ...')
flags.DEFINE_string('checkpoint', None, 'Upstream .pth/.pkl file.')
flags.DEFINE_string('output', None, 'Workdir to create.')
flags.DEFINE_string('config', None, 'Config file or name (default: configs/<arch>.py if it '
                    'exists, else configs/default.py).')


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Parameters of an upstream checkpoint as numpy arrays (torch's safe loader)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError('reading .pth/.pkl checkpoints needs torch: pip install torch') from None
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'cannot read checkpoint {path}: {e}') from None
  if isinstance(obj, dict) and 'model_state' in obj:
    obj = obj['model_state']
  if not isinstance(obj, dict) or not all(hasattr(v, 'numpy') for v in obj.values()):
    raise ValueError(f'{path} holds neither a state dict nor {{"model_state": state dict}}')
  return {k: v.detach().cpu().numpy() for k, v in obj.items()}


def module_options(module) -> dict[str, Any]:
  """The dataclass options of a Linen module (for ``config.model``)."""
  skip = {'parent', 'name', 'num_classes', 'dtype'}
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
          if f.init and f.name not in skip}


# The config file (with its argument) of each converter arch; others use configs/<model>.py.
ARCH_CONFIGS = {'pspnet_ade20k': 'pspnet:ade20k', 'icnet': 'icnet:merged', 'icnetBN': 'icnet',
                'frrnA': 'frrn:A', 'frrnB': 'frrn:B', 'frrnA_gn': 'frrn:A', 'frrnB_gn': 'frrn:B'}


def config_for(arch: str, model_name: str) -> str:
  """The config name for ``arch``: its entry in ARCH_CONFIGS, configs/<model>.py or default."""
  from semseg_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  if arch in ARCH_CONFIGS:
    return ARCH_CONFIGS[arch]
  own = os.path.join(config_lib._CONFIG_DIR, f'{model_name}.py')  # pylint: disable=protected-access
  return model_name if os.path.exists(own) else 'default'


def write_workdir(module, variables: dict[str, Any], model_name: str, output: str,
                  config_name: str | None = None) -> str:
  """Saves ``variables`` as step 0 of a workdir that eval/predict/fine-tuning accept."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from semseg_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  from semseg_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from semseg_jax import sharding  # pylint: disable=g-import-not-at-top
  from semseg_jax import train  # pylint: disable=g-import-not-at-top

  config = config_lib.load_config(config_name or config_for(model_name, model_name))
  config.unlock()
  options = {k: (tuple(v) if isinstance(v, list) else v) for k, v in module_options(module).items()}
  config.model = ml_collections.ConfigDict({'name': model_name, **options})
  config.num_classes = module.num_classes
  config.lock()
  config_lib.validate_config(config)
  os.makedirs(output, exist_ok=True)
  with open(os.path.join(output, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  mesh = sharding.create_mesh()
  tx = train.create_optimizer(config, train.create_learning_rate_fn(config))
  state = train.TrainState.create(apply_fn=module.apply, params=variables['params'], tx=tx,
                                  batch_stats=variables.get('batch_stats', {}))
  state = jax.device_put(state, sharding.replicated(mesh))
  manager = ckpt.create_manager(output)
  ckpt.save(manager, 0, state)
  manager.wait_until_finished()
  manager.close()
  return output


def main(argv):
  del argv
  for name in ('arch', 'checkpoint', 'output'):
    if not getattr(FLAGS, name):
      sys.exit(f'error: --{name} is required')
  from semseg_jax.convert import ptsemseg  # pylint: disable=g-import-not-at-top
  try:
    state_dict = load_torch_state_dict(FLAGS.checkpoint)
    module, variables = ptsemseg.from_ptsemseg(state_dict, FLAGS.arch)
    model_name = ptsemseg.ARCHS[FLAGS.arch].model
    write_workdir(module, variables, model_name, FLAGS.output,
                  FLAGS.config or config_for(FLAGS.arch, model_name))
  except (ValueError, ImportError, OSError) as e:
    sys.exit(f'error: {e}')
  print(f'wrote {FLAGS.output} ({FLAGS.arch}, {module.num_classes} classes); evaluate with: '
        f'python -m semseg_jax.main --workdir={FLAGS.output} --mode=eval')


if __name__ == '__main__':
  app.run(main)
