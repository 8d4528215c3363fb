"""predict(): label maps for any image size, honouring config.eval; prediction files."""
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from semseg_jax import evaluate
from semseg_jax import inference
from semseg_jax.data import transforms
from tests.test_evaluate import TinyNet
from tests.testing_utils import tiny_config

K = 5
MEAN, STD = (100.0, 110.0, 120.0), (50.0, 60.0, 70.0)
NORM = transforms.Normalization(MEAN, STD)


@pytest.fixture(scope='module')
def net():
  model = TinyNet(num_classes=K)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
  return model, variables


def uint8_image(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def normalised(image):
  return (image.astype(np.float32) - np.float32(MEAN)) / np.float32(STD)


def test_whole_pads_to_a_multiple_of_32_and_crops_back(net):
  model, variables = net
  image = uint8_image(37, 53)
  pred = inference.predict(image, model=model, variables=variables, normalization=NORM)
  assert pred.shape == (37, 53) and pred.dtype == np.uint8
  x = np.pad(normalised(image), ((0, 27), (0, 11), (0, 0)))[None]  # -> 64 x 64
  want = np.argmax(np.asarray(model.apply(variables, x, train=False).logits), -1)[0, :37, :53]
  np.testing.assert_array_equal(pred, want)


def test_normalization_presets_by_name_and_bad_values(net):
  model, variables = net
  image = uint8_image(32, 32)
  for name in ('imagenet', 'caffe_bgr'):
    by_name = inference.predict(image, model=model, variables=variables, normalization=name)
    preset = inference.predict(image, model=model, variables=variables,
                               normalization=transforms.NORMALIZATIONS[name])
    np.testing.assert_array_equal(by_name, preset)
  default = inference.predict(image, model=model, variables=variables)
  np.testing.assert_array_equal(default, inference.predict(
      image, model=model, variables=variables, normalization='imagenet'))
  with pytest.raises(ValueError, match="normalization must be .* got 'rgb'"):
    inference.Predictor(model, variables, normalization='rgb')


def test_predict_honours_slide_scales_and_flip(net):
  model, variables = net
  spec = evaluate.EvalSpec(mode='slide', window=(16, 16), stride=(8, 8), window_batch=3,
                           scales=(0.75, 1.0), flip=True)
  images = [uint8_image(20, 30, 1), uint8_image(9, 41, 2)]  # One is smaller than a window.
  preds = inference.predict(images, model=model, variables=variables, normalization=NORM,
                            spec=spec)
  assert [p.shape for p in preds] == [(20, 30), (9, 41)]
  views = evaluate.MultiViewPredictor(model.apply, K, spec)
  for image, pred in zip(images, preds):
    probs = np.asarray(views.probabilities(variables, jnp.asarray(normalised(image)[None])))
    np.testing.assert_array_equal(pred, np.argmax(probs[0], -1))
  # ... and slide really differs from the default whole-image view here.
  whole = inference.predict(images[0], model=model, variables=variables, normalization=NORM)
  assert (whole != preds[0]).any()


def test_predictor_from_config_reads_eval_and_normalisation(net):
  model, variables = net
  config = tiny_config(**{'eval.mode': 'slide', 'eval.window': (16, 16), 'eval.flip': True,
                          'dataset.normalization': 'custom', 'dataset.mean': MEAN,
                          'dataset.std': STD})
  predictor = inference.Predictor.from_config(config, model, variables)
  assert predictor.spec == evaluate.EvalSpec(mode='slide', window=(16, 16), stride=(11, 11),
                                             window_batch=4, flip=True)
  assert predictor.normalization.mean == MEAN and predictor.normalization.std == STD
  image = uint8_image(24, 24)
  direct = inference.Predictor(model, variables, normalization=NORM, spec=predictor.spec)
  np.testing.assert_array_equal(predictor(image), direct(image))
  # Caffe weights: the network sees BGR minus the BGR mean.
  caffe = inference.Predictor.from_config(
      tiny_config(**{'dataset.normalization': 'caffe_bgr'}), model, variables)
  x = image[..., ::-1].astype(np.float32) - np.float32((103.939, 116.779, 123.68))
  x = np.pad(x, ((0, 8), (0, 8), (0, 0)))[None]
  want = np.argmax(np.asarray(model.apply(variables, x, train=False).logits), -1)[0, :24, :24]
  np.testing.assert_array_equal(caffe(image), want)


def test_batches_and_bad_inputs(net):
  model, variables = net
  batch = np.stack([uint8_image(16, 24, s) for s in range(3)])
  preds = inference.predict(batch, model=model, variables=variables)
  assert preds.shape == (3, 16, 24)
  np.testing.assert_array_equal(preds[1], inference.predict(batch[1], model=model,
                                                            variables=variables))
  with pytest.raises(ValueError, match=r'RGB image \[H, W, 3\], got shape \(16, 24, 4\)'):
    inference.predict([np.zeros((16, 24, 4), np.uint8)], model=model, variables=variables)
  with pytest.raises(ValueError, match='needs workdir=... or both model=... and variables='):
    inference.predict(batch, model=model)
  with pytest.raises(ValueError, match="mode='slide'.* needs window"):
    inference.predict(batch, model=model, variables=variables,
                      spec=evaluate.EvalSpec(mode='slide'))


def test_predict_files_writes_labels_overlays_and_panels(net, tmp_path):
  model, variables = net
  inputs, labels = tmp_path / 'in', tmp_path / 'gt'
  inputs.mkdir()
  labels.mkdir()
  Image.fromarray(uint8_image(21, 34, 3)).save(inputs / 'a.png')
  Image.fromarray(uint8_image(16, 16, 4)).save(inputs / 'b.png')
  Image.fromarray(np.full((21, 34), 2, np.uint8)).save(labels / 'a.png')
  predictor = inference.Predictor(model, variables, normalization=NORM,
                                  spec=evaluate.EvalSpec(mode='slide', window=(16, 16)))
  palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9]], np.uint8)
  written = inference.predict_files(str(inputs / '*.png'), str(tmp_path / 'out'), predictor,
                                    palette, str(labels / '{stem}.png'))
  assert [p.rsplit('/', 1)[1] for p in written] == ['a.png', 'b.png']
  label_png = Image.open(tmp_path / 'out' / 'a.png')
  assert label_png.mode == 'P' and label_png.size == (34, 21)
  np.testing.assert_array_equal(np.asarray(label_png),
                                predictor(np.asarray(Image.open(inputs / 'a.png'))))
  assert Image.open(tmp_path / 'out' / 'a_overlay.png').size == (34, 21)
  # input | prediction | ground truth, 4-pixel gaps; b has no ground truth.
  assert Image.open(tmp_path / 'out' / 'a_panel.png').size == (3 * 34 + 8, 21)
  assert Image.open(tmp_path / 'out' / 'b_panel.png').size == (2 * 16 + 4, 16)
  with pytest.raises(FileNotFoundError, match='matches no file'):
    inference.predict_files(str(inputs / '*.jpg'), str(tmp_path / 'out'), predictor, palette)


def test_predict_from_a_workdir_uses_its_config(net, monkeypatch):
  """The workdir's config.eval and dataset normalisation (checkpoint loading stubbed)."""
  from semseg_jax import train  # pylint: disable=g-import-not-at-top
  model, variables = net
  config = tiny_config(**{'eval.mode': 'slide', 'eval.window': (16, 16),
                          'eval.scales': (0.5, 1.0), 'dataset.normalization': 'custom',
                          'dataset.mean': MEAN, 'dataset.std': STD})
  monkeypatch.setattr(train, 'load_config_from_workdir', lambda workdir: config)
  monkeypatch.setattr(train, 'restore_variables',
                      lambda config, workdir, which: (model, variables, 6))
  image = uint8_image(20, 28)
  got = inference.predict(image, workdir='/run')
  spec = evaluate.validate_eval_config(config)
  views = evaluate.MultiViewPredictor(model.apply, K, spec)
  probs = np.asarray(views.probabilities(variables, jnp.asarray(normalised(image)[None])))
  np.testing.assert_array_equal(got, np.argmax(probs[0], -1))
  # An explicit spec wins over the workdir's.
  whole = inference.predict(image, workdir='/run', spec=evaluate.EvalSpec())
  np.testing.assert_array_equal(whole, inference.predict(image, model=model, variables=variables,
                                                         normalization=NORM))
