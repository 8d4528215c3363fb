"""`python -m semseg_jax.convert`: upstream weights -> a workdir that eval/predict accept."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semseg_jax import inference
from semseg_jax import train
from semseg_jax.convert import __main__ as convert_cli
from semseg_jax.convert import ptsemseg
from semseg_jax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _upstream_unet_state_dict(feature_scale=16):
  """A random upstream-named U-Net state dict (6 classes)."""
  module = ptsemseg.build('unet', num_classes=6, feature_scale=feature_scale)
  x = jnp.zeros((1, 188, 188, 3))
  variables = module.init(jax.random.key(1), x, train=False)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda v: np.asarray(v) + 0.1 * rng.standard_normal(v.shape)
                           .astype(np.float32), variables)
  return ptsemseg.to_ptsemseg(variables, 'unet')


def test_converted_weights_predict_like_the_converted_module(tmp_path):
  state_dict = {f'module.{k}': v for k, v in _upstream_unet_state_dict().items()}
  # 'tile': upstream's valid-conv weights, usable at the config's 128x128 size.
  module, variables = ptsemseg.from_ptsemseg(state_dict, 'unet', feature_scale=16,
                                             padding='tile')
  out = convert_cli.write_workdir(module, variables, 'unet', str(tmp_path / 'run'),
                                  config_name='quickstart')
  config = train.load_config_from_workdir(out)
  assert config.model.padding == 'tile' and config.num_classes == 6
  restored_module, restored, step = train.restore_variables(config, out)
  assert step == 0
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  image = np.random.default_rng(1).integers(0, 255, (128, 128, 3), dtype=np.uint8)
  x = pipeline.normalization(config.dataset)(image)[None]
  logits = module.apply(variables, x, train=False).logits
  got = restored_module.apply(restored, x, train=False).logits
  np.testing.assert_allclose(got, logits, rtol=1e-6, atol=1e-6)


def test_cli_requires_its_flags(tmp_path):
  out = subprocess.run([sys.executable, '-m', 'semseg_jax.convert', '--arch=unet'], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 1 and 'error: --checkpoint is required' in out.stderr


@pytest.mark.parametrize('feature_scale', [4, 16])
def test_unet_width_is_read_off_the_state_dict(feature_scale):
  # The CLI passes no options: U-Net's feature_scale comes from the weights.
  sd = _upstream_unet_state_dict(feature_scale)
  module, variables = ptsemseg.from_ptsemseg(sd, 'unet')
  assert module.feature_scale == feature_scale
  assert variables['params']['conv1']['conv1']['conv']['kernel'].shape[-1] == (
      64 // feature_scale)
  # An explicit option still wins (and a wrong one is a clear error).
  with pytest.raises(ValueError, match='conv1.conv1.0.weight'):
    ptsemseg.from_ptsemseg(sd, 'unet', feature_scale=2 * feature_scale)


def test_cli_reads_a_torch_checkpoint(tmp_path):
  torch = pytest.importorskip('torch')
  sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
        _upstream_unet_state_dict().items()}
  path = tmp_path / 'unet.pkl'
  torch.save({'epoch': 3, 'model_state': sd}, path)
  out = subprocess.run([sys.executable, '-m', 'semseg_jax.convert', '--arch=unet',
                        f'--checkpoint={path}', f'--output={tmp_path / "run"}',
                        '--config=quickstart'], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert (tmp_path / 'run' / 'checkpoints' / '0').is_dir()


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
  pytest.importorskip('torch')
  bad = tmp_path / 'bad.pth'
  bad.write_bytes(b'not a checkpoint')
  with pytest.raises(ValueError, match='bad.pth'):
    convert_cli.load_torch_state_dict(str(bad))


@pytest.mark.parametrize('arch', ptsemseg.list_archs())
def test_every_converter_arch_has_a_loadable_config(arch):
  from semseg_jax import config as config_lib
  model_name = ptsemseg.ARCHS[arch].model
  config = config_lib.load_config(convert_cli.config_for(arch, model_name))
  assert config.model.name == model_name or convert_cli.config_for(arch, model_name) == 'default'
