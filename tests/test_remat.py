"""remat=True (jax.checkpoint per block) changes memory, never values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import semseg_jax as sj
from semseg_jax.models.backbones.resnet import ResNet

# name, options of a tiny network, input HxW.
CASES = [
    ('fcn8s', {'width_mult': 1 / 16}, 32),
    ('pspnet', {'width_mult': 1 / 16, 'block_config': (1, 2, 1, 1)}, 32),
    ('segnet', {'width_mult': 1 / 16}, 32),
    ('unet', {'feature_scale': 16}, 32),
]
NUM_CLASSES = 3


def _loss_fn(model, batch_stats, x, y):
  """Mean pixel cross-entropy of the logits (plus aux) in training mode."""

  def loss(params):
    out, _ = model.apply({'params': params, **batch_stats}, x,
                         train=True, mutable=['batch_stats'],
                         rngs={'dropout': jax.random.key(3)})
    total = 0.0
    for logits in (out.logits,) + tuple(out.aux):
      logp = jax.nn.log_softmax(logits.astype(jnp.float32))
      onehot = jax.nn.one_hot(y[:, :logits.shape[1], :logits.shape[2]],
                              NUM_CLASSES)
      total = total - jnp.mean(jnp.sum(logp * onehot, -1))
    return total

  return loss


def _residual_bytes(loss, params) -> int:
  """Bytes JAX keeps for the backward pass: the leaves of the VJP closure."""
  residuals = jax.eval_shape(lambda p: jax.tree.leaves(jax.vjp(loss, p)[1]),
                             params)
  return sum(r.size * r.dtype.itemsize for r in residuals)


def _setup(name, options, size, remat):
  model = sj.get_model(name, num_classes=NUM_CLASSES, remat=remat, **options)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, size, size, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, NUM_CLASSES, (2, size, size)), jnp.int32)
  variables = jax.jit(model.init, static_argnames='train')(
      jax.random.key(0), x, train=False)
  return model, variables, x, y


@pytest.mark.parametrize('name,options,size', CASES)
def test_remat_saves_fewer_residuals_same_variables(name, options, size):
  # XLA:CPU's compiled temp size (memory_analysis) barely moves with remat
  # (its scheduler already frees most residuals; see experiments/RESULTS.md
  # "## Memory"), so the test measures what remat controls: the residuals
  # JAX saves for the backward pass (traced only: no compilation).
  saved, trees = [], []
  for remat in (False, True):
    model, variables, x, y = _setup(name, options, size, remat)
    stats = {k: v for k, v in variables.items() if k == 'batch_stats'}
    saved.append(_residual_bytes(_loss_fn(model, stats, x, y), variables['params']))
    trees.append(jax.tree.structure(variables))
  # The variable tree (what checkpoints and converters see) is unchanged.
  assert trees[0] == trees[1]
  assert saved[1] < 0.8 * saved[0], (name, saved)


# Values: one plain-conv network and one with ResNet bottlenecks and pyramid
# pooling (the remat'd block kinds; compiling all four costs minutes on CPU).
@pytest.mark.parametrize('name,options,size', [CASES[1], CASES[3]])
def test_remat_same_loss_and_grads(name, options, size):
  results = []
  for remat in (False, True):
    model, variables, x, y = _setup(name, options, size, remat)
    stats = {k: v for k, v in variables.items() if k == 'batch_stats'}
    loss = _loss_fn(model, stats, x, y)
    results.append(jax.jit(jax.value_and_grad(loss))(variables['params']))
  (l0, g0), (l1, g1) = results
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-5 * float(np.abs(b).max() + 1e-12))


def test_resnet_backbone_remat_same_grads():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 32, 32, 3)),
                  jnp.float32)
  grads = []
  for remat in (False, True):
    net = ResNet(18, output_stride=8, width_mult=1 / 16, remat=remat)
    v = jax.jit(net.init, static_argnames='train')(jax.random.key(0), x,
                                                   train=False)

    def loss(p, net=net, v=v):
      feats, _ = net.apply({'params': p, 'batch_stats': v['batch_stats']}, x,
                           train=True, mutable=['batch_stats'])
      return jnp.sum(feats['layer4'] ** 2)

    grads.append(jax.grad(loss)(v['params']))
  for a, b in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[0]),
                  strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-5 * float(np.abs(b).max() + 1e-12))


def test_remat_models_advertise_the_field():
  """The trainer passes remat only to models with a ``remat`` field."""
  for name in ('fcn8s', 'fcn16s', 'fcn32s', 'pspnet', 'segnet', 'unet'):
    assert 'remat' in sj.get_model(name, num_classes=2).__dataclass_fields__


def test_config_switch_reaches_the_model_or_names_the_network():
  from semseg_jax import config as config_lib
  from semseg_jax import train
  config = config_lib.load_config('quickstart', {'remat': True})
  assert train.create_model(config).remat is True
  assert train.create_model(config_lib.load_config('quickstart')).remat is False
  config = config_lib.load_config('enet', {'remat': True})
  with pytest.raises(config_lib.ConfigError, match=r"config.remat=True: network 'enet'.*unet"):
    train.create_model(config)
