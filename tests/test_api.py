"""The library surface: import without TensorFlow, the registry, clear errors."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import semseg_jax as sj


def test_import_is_light_and_tensorflow_free():
  code = ('import sys, semseg_jax as sj, jax\n'
          'heavy = [m for m in ("tensorflow", "orbax", "grain", "tensorflow_datasets") '
          'if m in sys.modules]\n'
          'assert not heavy, heavy\n'
          'model = sj.get_model("fcn8s", num_classes=21)\n'
          'x = jax.numpy.zeros((1, 64, 64, 3))\n'
          'v = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))\n'
          'assert "tensorflow" not in sys.modules\n'
          'print(sorted(sj.list_models()))\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'fcn8s' in out.stdout


def test_list_models_has_the_fcn_family():
  assert {'fcn32s', 'fcn16s', 'fcn8s', 'unet'} <= set(sj.list_models())


def test_get_model_rejects_unknown_names_and_options():
  with pytest.raises(ValueError, match="unknown model 'fcn9s'.*fcn8s"):
    sj.get_model('fcn9s', num_classes=3)
  with pytest.raises(ValueError, match="has no option 'widht'"):
    sj.get_model('unet', num_classes=3, widht=2)


def test_models_return_segmentation_output_at_input_resolution():
  model = sj.get_model('unet', num_classes=5, feature_scale=32)
  x = jnp.zeros((2, 48, 40, 3))
  # As the README has it: a jitted init.
  variables = jax.jit(model.init, static_argnames='train')(
      jax.random.key(0), x, train=False)
  out = model.apply(variables, x, train=False)
  assert isinstance(out, sj.SegmentationOutput)
  assert out.logits.shape == (2, 48, 40, 5) and out.aux == ()
