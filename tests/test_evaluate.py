"""Evaluation modes: whole / slide, multi-scale, flip, the valid mask, bounded memory."""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from semseg_jax import config as config_lib
from semseg_jax import evaluate
from semseg_jax import sharding
from semseg_jax import train
from semseg_jax.data import pipeline
from semseg_jax.models import layers
from semseg_jax.models.output import SegmentationOutput
from tests.testing_utils import tiny_config

K = 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyNet(nn.Module):
  """Two 3x3 convolutions: any input size, and a receptive field that sees window borders."""
  num_classes: int = K

  @nn.compact
  def __call__(self, x, *, train: bool):
    del train
    x = nn.relu(nn.Conv(6, (3, 3))(x))
    return SegmentationOutput(nn.Conv(self.num_classes, (3, 3))(x))


@pytest.fixture(scope='module')
def net():
  model = TinyNet()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
  logits = jax.jit(lambda x: model.apply(variables, x, train=False).logits)
  return model, variables, logits


def images(b=2, h=24, w=40, seed=1):
  return np.asarray(jax.random.normal(jax.random.key(seed), (b, h, w, 3)), np.float32)


def softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def probs(model, variables, x, **spec):
  predictor = evaluate.MultiViewPredictor(model.apply, K, evaluate.EvalSpec(**spec))
  return np.asarray(predictor.probabilities(variables, jnp.asarray(x)))


def slide_reference(logits, x, window, stride, flip=False):
  """Softmax of every window (and its mirror), added up and divided by the coverage."""
  (b, h, w, _), (wh, ww) = x.shape, window
  ys = sorted({min(i * stride[0], h - wh) for i in range(h // stride[0] + 2)})
  xs = sorted({min(i * stride[1], w - ww) for i in range(w // stride[1] + 2)})
  acc, count = np.zeros((b, h, w, K)), np.zeros((h, w, 1))
  for y in ys:
    for x0 in xs:
      win = x[:, y:y + wh, x0:x0 + ww]
      acc[:, y:y + wh, x0:x0 + ww] += softmax(logits(win))
      count[y:y + wh, x0:x0 + ww] += 1
      if flip:
        acc[:, y:y + wh, x0:x0 + ww] += softmax(logits(win[:, :, ::-1]))[:, :, ::-1]
        count[y:y + wh, x0:x0 + ww] += 1
  return acc / count


def test_window_starts_cover_the_image_and_end_at_its_border():
  assert evaluate.window_starts(16, 16, 10) == [0]
  assert evaluate.window_starts(24, 16, 8) == [0, 8]
  assert evaluate.window_starts(40, 16, 12) == [0, 12, 24]
  assert evaluate.window_starts(30, 16, 10) == [0, 10, 14]  # The last window is shifted back.


def test_slide_with_one_window_equals_whole(net):
  model, variables, _ = net
  x = images()
  whole = probs(model, variables, x)
  slide = probs(model, variables, x, mode='slide', window=(24, 40), stride=(16, 27))
  np.testing.assert_allclose(slide, whole, atol=1e-5)
  assert np.abs(whole.sum(-1) - 1).max() < 1e-5


def test_overlapping_windows_average_their_probabilities(net):
  model, variables, logits = net
  x = images()
  got = probs(model, variables, x, mode='slide', window=(16, 16), stride=(8, 12),
              window_batch=4)
  want = slide_reference(logits, x, (16, 16), (8, 12))
  np.testing.assert_allclose(got, want, atol=1e-5)
  # The windows' borders matter (3x3 context): plain whole-image inference differs.
  assert np.abs(got - probs(model, variables, x)).max() > 1e-3


def test_slide_with_flip_and_a_partial_last_group(net):
  model, variables, logits = net
  x = images(b=1, h=20, w=30)
  # 2 x 3 positions x 2 flips = 12 windows in groups of 5: the last group has 3 fillers.
  got = probs(model, variables, x, mode='slide', window=(16, 16), stride=(8, 10),
              window_batch=5, flip=True)
  np.testing.assert_allclose(got, slide_reference(logits, x, (16, 16), (8, 10), flip=True),
                             atol=1e-5)


def test_image_smaller_than_the_window_is_padded(net):
  model, variables, logits = net
  x = images(b=1, h=10, w=12)
  got = probs(model, variables, x, mode='slide', window=(16, 16))
  padded = np.pad(x, ((0, 0), (0, 6), (0, 4), (0, 0)))
  np.testing.assert_allclose(got, softmax(logits(padded))[:, :10, :12], atol=1e-5)


@pytest.mark.parametrize('mode', ['whole', 'slide'])
def test_flip_averages_the_mirrored_prediction(net, mode):
  model, variables, logits = net
  x = images()
  got = probs(model, variables, x, mode=mode, window=(24, 40), flip=True)
  want = (softmax(logits(x)) + softmax(logits(x[:, :, ::-1]))[:, :, ::-1]) / 2
  np.testing.assert_allclose(got, want, atol=1e-5)


def _resized_probs(p, size):
  return np.asarray(layers.resize(jnp.asarray(p, jnp.float32), size))


def test_scale_one_equals_whole_and_scales_average_resized_probabilities(net):
  model, variables, logits = net
  x = images()
  np.testing.assert_allclose(probs(model, variables, x, scales=(1.0,)),
                             softmax(logits(x)), atol=1e-5)
  # 24x40 at 0.5 -> 12x20, at 1.3 -> int(31.2 + .5) x int(52 + .5) = 31x52; the
  # reference resizes with layers.resize, an independent torch-equivalent bilinear.
  sizes = [(12, 20), (31, 52)]
  want = softmax(logits(x))
  for size in sizes:
    want = want + _resized_probs(softmax(logits(layers.resize(jnp.asarray(x), size))), (24, 40))
  got = probs(model, variables, x, scales=(1.0, 0.5, 1.3))
  np.testing.assert_allclose(got, want / 3, atol=1e-5)
  # slide: the 12x20 image is padded up to one 24x40 window, the 31x52 one needs 2x2 windows.
  want = slide_reference(logits, x, (24, 40), (16, 27))
  small = np.pad(np.asarray(layers.resize(jnp.asarray(x), sizes[0])),
                 ((0, 0), (0, 12), (0, 20), (0, 0)))
  want = want + _resized_probs(softmax(logits(small))[:, :12, :20], (24, 40))
  big = np.asarray(layers.resize(jnp.asarray(x), sizes[1]))
  want = want + _resized_probs(slide_reference(logits, big, (24, 40), (16, 27)), (24, 40))
  got = probs(model, variables, x, mode='slide', window=(24, 40), scales=(1.0, 0.5, 1.3))
  np.testing.assert_allclose(got, want / 3, atol=1e-5)


def test_whole_pads_to_a_multiple_when_asked(net):
  model, variables, logits = net
  x = images(b=1, h=20, w=30)
  predictor = evaluate.MultiViewPredictor(model.apply, K, evaluate.EvalSpec(), pad_multiple=16)
  got = np.asarray(predictor.predictions(variables, jnp.asarray(x)))
  padded = np.pad(x, ((0, 0), (0, 12), (0, 2), (0, 0)))
  np.testing.assert_array_equal(got, np.argmax(logits(padded), -1)[:, :20, :30])


def test_slide_memory_does_not_grow_with_image():
  """The per-group call's temporaries depend on the window group, not the image."""
  model = TinyNet(num_classes=19)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)),
                                                train=False))
  predictor = evaluate.MultiViewPredictor(
      model.apply, 19, evaluate.EvalSpec(mode='slide', window=(128, 128), stride=(96, 96),
                                         window_batch=2, flip=True))
  temp, groups = {}, {}
  for h, w in [(512, 1024), (1024, 2048)]:
    image = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
    acc = jax.ShapeDtypeStruct((1, h, w, 19), jnp.float32)
    group_list, _ = predictor.slide_groups((h, w))
    compiled = predictor._group.lower(variables, image, acc, *group_list[0]).compile()
    stats = compiled.memory_analysis()
    temp[h], groups[h] = stats.temp_size_in_bytes, len(group_list)
    # The accumulator is updated in place (the output aliases the donated input).
    assert stats.alias_size_in_bytes == h * w * 19 * 4
  assert groups == {512: 5 * 11, 1024: 11 * 21}  # Positions x 2 flips / 2 windows per call.
  assert temp[512] == temp[1024], temp
  # ... and stays far below one full-image forward pass at 1024x2048.
  whole = evaluate.MultiViewPredictor(model.apply, 19, evaluate.EvalSpec())
  image = jax.ShapeDtypeStruct((1, 1024, 2048, 3), jnp.float32)
  whole_temp = whole._whole.lower(variables, image).compile().memory_analysis().temp_size_in_bytes
  assert temp[1024] * 10 < whole_temp, (temp, whole_temp)


def _config(**eval_values):
  return {'dataset': {'image_size': (32, 48)}, 'eval': dict(eval_values)}


def test_eval_config_defaults_resolve_window_and_stride():
  spec = evaluate.validate_eval_config(_config(mode='slide', window=None, stride=None))
  assert spec.window == (32, 48) and spec.stride == (21, 32)
  assert spec.scales == (1.0,) and spec.flip is False and spec.window_batch == 4
  config = tiny_config()
  assert evaluate.validate_eval_config(config) == evaluate.EvalSpec(
      window=(32, 32), stride=(21, 21))
  # A workdir config saved before config.eval existed: the defaults.
  assert evaluate.validate_eval_config({'dataset': {'image_size': [8, 8]}}).mode == 'whole'


@pytest.mark.parametrize('values, match', [
    ({'mode': 'tile'}, r"config\.eval\.mode='tile' must be one of whole, slide"),
    ({'window': (0, 16)}, r'config\.eval\.window=\(0, 16\)'),
    ({'window': (16,)}, r'config\.eval\.window=\(16,\)'),
    ({'stride': (8, 64)}, r'config\.eval\.stride=\(8, 64\) must not exceed the window'),
    ({'window_batch': 0}, r'config\.eval\.window_batch=0'),
    ({'scales': ()}, r'config\.eval\.scales=\(\)'),
    ({'scales': (1.0, -0.5)}, r'config\.eval\.scales=\(1\.0, -0\.5\)'),
    ({'flip': 'yes'}, r"config\.eval\.flip='yes'"),
    ({'windw': (8, 8)}, r'unknown config key config\.eval\.windw'),
])
def test_invalid_eval_config_raises_naming_the_key(values, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    evaluate.validate_eval_config(_config(**values))


def test_invalid_eval_value_in_a_real_config():
  config = tiny_config(**{'eval.mode': 'slide', 'eval.stride': (40, 8)})
  with pytest.raises(config_lib.ConfigError, match=r'config\.eval\.stride=\(40, 8\)'):
    evaluate.validate_eval_config(config)


@pytest.fixture(scope='module')
def six_class_net():
  # The 6 classes of `shapes`; a registry U-Net would cost a minute of compiling here.
  model = TinyNet(num_classes=6)
  return model, model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)


def _evaluator(net, **overrides):
  config = tiny_config(**overrides)
  mesh = sharding.create_mesh(jax.devices()[:1])
  return evaluate.Evaluator(config, net[0], mesh, train.check_dataset(config)), net[1], mesh


def test_evaluator_slide_one_window_scores_equal_whole(six_class_net, tmp_path):
  whole, variables, _ = _evaluator(six_class_net)
  # window = dataset.image_size = 32x32: one window per image.
  slide, _, _ = _evaluator(six_class_net, **{'eval.mode': 'slide'})
  a = whole.evaluate(variables, show_progress=False, workdir=str(tmp_path), step=3)
  b = slide.evaluate(variables, show_progress=False)
  np.testing.assert_array_equal(a['confusion_matrix'], b['confusion_matrix'])
  # Every labelled pixel of the 6 validation images, counted once.
  labelled = sum(int((b['label'] != 255).sum()) for b in pipeline.make_eval_iterator(
      whole.source, whole.config.dataset, batch_size=4))
  assert a['confusion_matrix'].sum() == labelled > 0
  # The logged panel starts with the input image, un-normalised with the dataset's preset.
  first = next(pipeline.make_eval_iterator(whole.source, whole.config.dataset, batch_size=4))
  panel = np.asarray(Image.open(tmp_path / 'predictions' / 'val_step_000003.png'))
  raw = pipeline.normalization(whole.config.dataset).invert(first['image'][0])
  np.testing.assert_array_equal(panel[:32, :32], raw)


@pytest.mark.parametrize('mode', ['whole', 'slide'])
def test_evaluator_counts_only_valid_labelled_pixels(six_class_net, mode):
  evaluator, variables, mesh = _evaluator(
      six_class_net, **{'eval.mode': mode, 'eval.window': (16, 16), 'eval.flip': True})
  rng = np.random.default_rng(0)
  label = rng.integers(0, 6, (4, 32, 32)).astype(np.int32)
  label[:, :3] = 255
  valid = np.ones((4, 32, 32), bool)
  valid[:, :, 20:] = False
  batch = {'image': images(4, 32, 32), 'label': label, 'valid': valid}
  cm, preds = evaluator._step(variables, sharding.make_global_batch(batch, mesh))
  cm, preds = np.asarray(cm), np.asarray(preds)
  keep = valid & (label != 255)
  want = np.zeros((6, 6), np.int64)
  np.add.at(want, (label[keep], preds[keep]), 1)
  np.testing.assert_array_equal(cm, want)
  assert cm.sum() == 4 * 29 * 20
  # The predictions are the argmax of the predictor's averaged probabilities.
  p = evaluator.predictor.probabilities(variables, jnp.asarray(batch['image']))
  np.testing.assert_array_equal(preds, np.argmax(np.asarray(p), -1))


class _RecordingWriter:

  def __init__(self):
    self.scalars, self.texts = {}, {}

  def write_scalars(self, step, scalars):
    self.scalars[step] = dict(scalars)

  def write_texts(self, step, texts):
    self.texts[step] = dict(texts)


def test_log_scores_writes_per_class_iou_and_the_table():
  cm = np.array([[3, 1], [0, 4]])
  scores = evaluate.metrics_lib.compute_scores(cm)
  writer = _RecordingWriter()
  evaluate.log_scores(writer, 7, scores, ('sky', 'road'))
  assert writer.scalars[7]['val/iou/sky'] == pytest.approx(3 / 4)
  assert writer.scalars[7]['val/iou/road'] == pytest.approx(4 / 5)
  assert writer.scalars[7]['val/mean_iou'] == pytest.approx((3 / 4 + 4 / 5) / 2)
  table = writer.texts[7]['val/iou_table']
  assert '| sky | 75.00 |' in table and '| road | 80.00 |' in table


def test_sharded_slide_equals_one_device():
  """On a 2-device mesh the windows of each device's images run there; same numbers."""
  code = '''
import jax, jax.numpy as jnp, numpy as np
from semseg_jax import evaluate, sharding
from tests.test_evaluate import TinyNet
model = TinyNet(num_classes=5)
variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
x = np.asarray(jax.random.normal(jax.random.key(1), (4, 24, 40, 3)))
spec = evaluate.EvalSpec(mode='slide', window=(16, 16), stride=(8, 12), window_batch=3,
                         flip=True, scales=(1.0, 0.75))
mesh = sharding.create_mesh()
assert mesh.devices.size == 2
sharded = evaluate.MultiViewPredictor(model.apply, 5, spec, mesh=mesh).probabilities(
    variables, jax.device_put(x, sharding.batch_sharding(mesh)))
assert sharded.sharding.spec == jax.sharding.PartitionSpec('data'), sharded.sharding
single = evaluate.MultiViewPredictor(model.apply, 5, spec).probabilities(variables, x)
print('maxdiff', float(np.abs(np.asarray(sharded) - np.asarray(single)).max()))
'''
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert float(out.stdout.split('maxdiff')[1]) < 1e-6
