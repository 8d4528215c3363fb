"""semseg_jax.export: artifacts reloaded by their own runtime give the jitted model's outputs."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semseg_jax import export
from semseg_jax.data.transforms import Normalization
from semseg_jax.inference import Predictor
from semseg_jax.models import get_model
from semseg_jax.models.output import SegmentationOutput

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HW = (64, 64)
# Tiny widths of the three networks the issue names (FCN-8s: learned upsampling
# and crops; SegNet: argmax pooling and scatter unpooling; PSPNet: dilated
# ResNet, pyramid pooling and bilinear resizes).
NETWORKS = {
    'fcn8s': {'width_mult': 1 / 16},
    'segnet': {'width_mult': 1 / 16},
    'pspnet': {'width_mult': 1 / 32, 'block_config': (1, 1, 1, 1)},
}
K = 5


def random_variables(model, hw=HW, seed=0):
  """He-scaled random weights and non-trivial BatchNorm statistics.

  Initial Flax weights shrink the activations layer by layer (SegNet's
  logits are ~1e-5 at init), which would make any tolerance meaningless;
  these keep the logits O(1). Built from shapes only: no init compile.
  """
  x = jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      fan_in = np.prod(leaf.shape[:-1])
      return rng.standard_normal(leaf.shape).astype(np.float32) * np.sqrt(2 / fan_in)
    if name.endswith("['var']"):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    if name.endswith("['scale']"):
      return 1 + 0.1 * rng.standard_normal(leaf.shape).astype(np.float32)
    return 0.1 * rng.standard_normal(leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope='module', params=sorted(NETWORKS))
def network(request):
  model = get_model(request.param, K, **NETWORKS[request.param])
  variables = random_variables(model)
  fn = export.inference_fn(model, variables)
  x = np.random.default_rng(1).standard_normal((3, *HW, 3)).astype(np.float32)
  ref = np.asarray(jax.jit(fn)(x))
  assert np.abs(ref).max() > 0.1  # Logits on an O(1) scale, so the tolerances mean something.
  return request.param, model, variables, x, ref


def test_stablehlo_reloaded_matches_jit_for_any_batch(network, tmp_path):
  name, model, variables, x, ref = network
  meta = export.export_model(model, variables, str(tmp_path), fmt='stablehlo',
                             spec=export.InputSpec(None, HW), model_name=name,
                             mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0),
                             class_names=[f'c{i}' for i in range(K)])
  run = export.load_stablehlo(str(tmp_path / 'model.stablehlo'))
  # One artifact, two batch sizes, each against the jitted model at that batch, within
  # 1e-5 of the logits' scale: on CPU a 1x1 convolution is a matmul over B*H*W rows, and
  # its float rounding (~3e-7 relative) depends on the batch, and at batch 1 on whether the
  # batch was symbolic (PSPNet's pyramid pooling).
  ref1 = np.asarray(jax.jit(export.inference_fn(model, variables))(x[:1]))
  for got, want in ((run(x), ref), (run(x[:1]), ref1)):
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5 * np.abs(want).max(), rtol=0)
  assert set(run.exported.platforms) >= {'cpu', 'cuda', 'tpu'}
  on_disk = json.loads((tmp_path / 'model.stablehlo.json').read_text())
  assert on_disk == meta
  assert meta['input'] == {'name': 'image', 'shape': [None, 64, 64, 3], 'dtype': 'float32',
                           'layout': 'NHWC', 'spatial_multiple': None, 'normalised': True}
  assert meta['outputs']['shape'] == [None, 64, 64, K]
  assert meta['normalisation']['mean'] == [1.0, 2.0, 3.0]
  assert meta['class_names'] == ['c0', 'c1', 'c2', 'c3', 'c4'] and meta['note'] is None


def test_onnx_reloaded_matches_jit_for_any_batch(network, tmp_path):
  name, model, variables, x, ref = network
  meta = export.export_model(model, variables, str(tmp_path), fmt='onnx',
                             spec=export.InputSpec(None, HW), model_name=name)
  run = export.load_onnx(str(tmp_path / 'model.onnx'))
  (inp,) = run.session.get_inputs()
  assert inp.name == 'image' and inp.shape[1:] == [64, 64, 3] and isinstance(inp.shape[0], str)
  assert run.session.get_outputs()[0].name == 'logits'
  for n in (3, 1):
    np.testing.assert_allclose(run(x[:n]), ref[:n], atol=1e-4, rtol=0)
  assert meta['format'] == 'onnx' and meta['input']['shape'] == [None, 64, 64, 3]
  assert meta['files'][0] == 'model.onnx' and set(meta['files']) <= {'model.onnx', 'model.onnx.data'}


def test_onnx_fixed_batch_and_labels_output(tmp_path):
  model = get_model('segnet', K, **NETWORKS['segnet'])
  variables = random_variables(model)
  mean, std = (120.0, 110.0, 100.0), (60.0, 55.0, 50.0)
  image = np.random.default_rng(2).integers(0, 256, (2, *HW, 3), dtype=np.uint8)
  want = np.stack([Predictor(model, variables, normalization=Normalization(mean, std))(im) for im in image])
  meta = export.export_model(model, variables, str(tmp_path), fmt='onnx',
                             spec=export.InputSpec(2, HW, 'labels'), mean=mean, std=std)
  run = export.load(str(tmp_path))
  assert run.session.get_inputs()[0].shape == [2, 64, 64, 3]
  got = run(image)
  assert got.dtype == np.uint8 and got.shape == (2, *HW)
  np.testing.assert_array_equal(got, want)
  assert meta['input']['dtype'] == 'uint8' and meta['outputs'] == {
      'name': 'labels', 'dtype': 'uint8', 'shape': [2, 64, 64]}
  assert meta['normalisation']['applied_inside'] is True
  with pytest.raises(Exception, match='image'):  # onnxruntime rejects another batch.
    run(image[:1])


def test_stablehlo_labels_output_equals_predictor(tmp_path):
  model = get_model('fcn8s', K, **NETWORKS['fcn8s'])
  variables = random_variables(model)
  mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
  image = np.random.default_rng(3).integers(0, 256, (2, *HW, 3), dtype=np.uint8)
  export.export_model(model, variables, str(tmp_path), spec=export.InputSpec(None, HW, 'labels'),
                      mean=mean, std=std)
  got = np.asarray(export.load(str(tmp_path))(image))
  want = np.stack([Predictor(model, variables, normalization=Normalization(mean, std))(im) for im in image])
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got, want)


def test_labels_output_in_bgr_matches_predictor(tmp_path):
  """Converted Caffe weights take BGR: the artifact flips channels as the pipeline does."""
  from semseg_jax.data import transforms  # pylint: disable=g-import-not-at-top
  model = get_model('fcn8s', K, **NETWORKS['fcn8s'])
  variables = random_variables(model)
  norm = transforms.Normalization((103.939, 116.779, 123.68), (1.0, 1.0, 1.0), bgr=True)
  image = np.random.default_rng(5).integers(0, 256, (1, *HW, 3), dtype=np.uint8)
  meta = export.export_model(model, variables, str(tmp_path),
                             spec=export.InputSpec(None, HW, 'labels'),
                             mean=norm.mean, std=norm.std, bgr=True)
  got = np.asarray(export.load(str(tmp_path))(image))
  want = Predictor(model, variables, normalization=norm)(image[0])
  np.testing.assert_array_equal(got[0], want)
  rgb = np.asarray(jax.jit(export.inference_fn(model, variables, 'labels', mean=norm.mean,
                                               std=norm.std))(image))
  assert (rgb != got).mean() > 0.05  # The channel order matters for these weights.
  assert meta['normalisation']['channel_order'] == 'BGR'


class ConvNet(nn.Module):
  """Stride-32 encoder + nearest upsampling: valid at any multiple of 32."""

  @nn.compact
  def __call__(self, x, *, train: bool):
    h = x
    for _ in range(5):
      h = nn.relu(nn.Conv(4, (3, 3), strides=2)(h))
    h = nn.Conv(3, (1, 1))(h)
    b, hh, ww, c = h.shape
    h = jnp.broadcast_to(h[:, :, None, :, None, :], (b, hh, 32, ww, 32, c))
    return SegmentationOutput(logits=h.reshape(b, hh * 32, ww * 32, c))


def test_polymorphic_spatial_size_where_the_network_allows(tmp_path):
  model = ConvNet()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  meta = export.export_model(model, variables, str(tmp_path), spec=export.InputSpec(None, None),
                             fallback_size=(64, 64))
  assert meta['input']['shape'] == [None, None, None, 3] and meta['note'] is None
  assert meta['input']['spatial_multiple'] == 32
  run = export.load_stablehlo(str(tmp_path / 'model.stablehlo'))
  rng = np.random.default_rng(4)
  for shape in [(2, 64, 96, 3), (1, 32, 32, 3)]:
    x = rng.standard_normal(shape).astype(np.float32)
    want = model.apply(variables, x, train=False).logits
    np.testing.assert_allclose(np.asarray(run(x)), np.asarray(want), atol=1e-5, rtol=0)
  with pytest.raises(Exception, match='(?i)shape|dimension|constraint|divisible|32'):
    run(np.zeros((1, 40, 32, 3), np.float32))  # Not a multiple of 32.


def test_polymorphic_spatial_falls_back_to_fixed_with_a_message(tmp_path):
  model = get_model('segnet', K, **NETWORKS['segnet'])
  variables = random_variables(model)
  meta = export.export_model(model, variables, str(tmp_path), spec=export.InputSpec(None, None),
                             fallback_size=HW, model_name='segnet')
  assert meta['input']['shape'] == [None, 64, 64, 3]
  assert 'segnet' in meta['note'] and 'polymorphic' in meta['note'] and '64x64' in meta['note']
  with pytest.raises(export.ExportError, match='segnet.*--export_size'):
    export.export_model(model, variables, str(tmp_path / 'no'), spec=export.InputSpec(None, None),
                        model_name='segnet')


class CallbackNet(nn.Module):
  """A network with a host callback, which ONNX cannot express."""

  @nn.compact
  def __call__(self, x, *, train: bool):
    y = nn.Conv(2, (1, 1))(x)
    y = jax.pure_callback(np.tanh, jax.ShapeDtypeStruct(y.shape, y.dtype), y)
    return SegmentationOutput(logits=y)


def test_onnx_names_the_operation_it_cannot_export(tmp_path):
  model = CallbackNet()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  with pytest.raises(export.ExportError,
                     match=r"cannot export callbacknet to ONNX: operation 'pure_callback' at "
                           r'\S*test_export\.py:\d+'):
    export.export_model(model, variables, str(tmp_path), fmt='onnx',
                        spec=export.InputSpec(1, (32, 32)), model_name='callbacknet')
  assert not (tmp_path / 'model.onnx.json').exists()


def test_onnx_export_leaves_jax_numpy_untouched(tmp_path):
  cumsum = jnp.cumsum
  model = ConvNet()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  export.export_model(model, variables, str(tmp_path), fmt='onnx',
                      spec=export.InputSpec(1, (32, 32)))
  assert jnp.cumsum is cumsum  # jax2onnx 0.17 replaces it for good on import.
  np.testing.assert_array_equal(jnp.cumsum(jnp.ones((2, 2)), 0), [[1, 1], [2, 2]])


@pytest.mark.parametrize('kwargs, match', [
    ({'fmt': 'tflite'}, "format 'tflite' must be one of stablehlo, onnx, savedmodel"),
    ({'spec': export.InputSpec(0, HW)}, 'batch=0 must be a positive integer'),
    ({'spec': export.InputSpec(1, HW, 'probs')}, "output='probs' must be one of logits, labels"),
    ({'spec': export.InputSpec(None, (64,))}, r'size=\(64,\) must be \(H, W\)'),
])
def test_bad_requests_are_one_line_errors(tmp_path, kwargs, match):
  model = ConvNet()
  with pytest.raises(export.ExportError, match=match):
    export.export_model(model, {}, str(tmp_path), **kwargs)


@pytest.mark.parametrize('value, want', [('polymorphic', None), ('8', 8)])
def test_parse_batch(value, want):
  assert export.parse_batch(value) == want


@pytest.mark.parametrize('value', ['0', '-1', 'many'])
def test_parse_batch_rejects(value):
  with pytest.raises(export.ExportError, match=f'--export_batch={value!r}'):
    export.parse_batch(value)


def test_parse_size():
  assert export.parse_size(None) == 'config'
  assert export.parse_size('polymorphic') is None
  assert export.parse_size('512,1024') == (512, 1024)
  for bad in ('512', '0,3', 'a,b'):
    with pytest.raises(export.ExportError, match=f'--export_size={bad!r}'):
      export.parse_size(bad)


def test_load_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='no StableHLO artifact at .*missing'):
    export.load_stablehlo(str(tmp_path / 'missing'))
  bad = tmp_path / 'model.stablehlo'
  bad.write_bytes(b'not a flatbuffer')
  with pytest.raises(export.ExportError, match='model.stablehlo is not a jax.export artifact'):
    export.load_stablehlo(str(bad))


def test_importing_export_imports_neither_tensorflow_nor_jax2onnx():
  code = ('import sys; import semseg_jax.export, semseg_jax.main; '
          "print([m for m in ('tensorflow', 'jax2onnx', 'onnxruntime') if m in sys.modules])")
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == '[]'


_SAVEDMODEL_SCRIPT = '''
import sys, numpy as np, jax, tensorflow as tf
sys.path.insert(0, sys.argv[1])
from semseg_jax import export
from semseg_jax.data.transforms import Normalization
from semseg_jax.models import get_model
from tests.test_export import random_variables
model = get_model('segnet', 5, width_mult=1 / 16)
variables = random_variables(model)
export.export_model(model, variables, sys.argv[2], fmt='savedmodel',
                    spec=export.InputSpec(None, (64, 64)))
x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
ref = np.asarray(jax.jit(export.inference_fn(model, variables))(x))
loaded = tf.saved_model.load(sys.argv[2] + '/savedmodel')
got = loaded.signatures['serving_default'](image=tf.constant(x))['logits'].numpy()
print('MAXDIFF', float(np.abs(got - ref).max()), float(np.abs(ref).max()))
'''


def test_savedmodel_in_a_tensorflow_subprocess(tmp_path):
  """TensorFlow is imported only in a child process: this one stays TF-free."""
  python = os.environ.get('SEMSEG_TF_PYTHON', sys.executable)
  probe = subprocess.run([python, '-c', 'import tensorflow'], capture_output=True)
  if probe.returncode:
    pytest.skip(f'tensorflow is not importable by {python} (the [tf] extra; or set '
                'SEMSEG_TF_PYTHON to a python that has it)')
  script = tmp_path / 'savedmodel.py'
  script.write_text(_SAVEDMODEL_SCRIPT)
  out = subprocess.run([python, str(script), ROOT, str(tmp_path)], capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  diff, scale = map(float, out.stdout.split('MAXDIFF')[1].split())
  assert diff <= 1e-5 and scale > 0.1
  assert json.loads((tmp_path / 'savedmodel.json').read_text())['format'] == 'savedmodel'
  assert 'tensorflow' not in sys.modules
