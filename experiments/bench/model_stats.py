"""Parameters and forward FLOPs of every registered network (XLA cost analysis).

    python experiments/bench/model_stats.py [--models=fcn8s,enet] [--markdown]

Each network is built at its paper's class count and input size (the table
below), shapes are traced with ``jax.eval_shape`` (no weights are created) and
the eval-mode forward pass is lowered and compiled for the local backend to
read ``cost_analysis()['flops']`` (XLA counts a multiply-add as 2 FLOPs).
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import semseg_jax as sj

# name: (num_classes, (H, W), options, paper params, paper FLOPs at that size)
NETWORKS = {
    'fcn32s': (21, (500, 500), {}, None, None),
    'fcn16s': (21, (500, 500), {}, None, None),
    'fcn8s': (21, (500, 500), {}, None, None),
    'unet': (21, (572, 572), {'padding': 'same'}, None, None),
    'segnet': (11, (360, 480), {}, '29.5M', None),
    'pspnet': (21, (473, 473), {}, None, None),
    'icnet': (19, (1024, 2048), {}, None, None),
    'icnetBN': (19, (1024, 2048), {}, None, None),
    'frrnA': (19, (256, 512), {}, None, None),
    'frrnB': (19, (512, 1024), {}, None, None),
    'linknet': (19, (360, 640), {}, '11.5M', '21.2G'),
    'enet': (19, (360, 640), {}, '0.37M', '3.83G'),
    'fcdensenet56': (11, (360, 480), {}, '1.5M', None),
    'fcdensenet67': (11, (360, 480), {}, '3.5M', None),
    'fcdensenet103': (11, (360, 480), {}, '9.4M', None),
    'refinenet': (21, (512, 512), {}, None, None),
    'gfrnet': (11, (360, 480), {}, None, None),
    'deeplabv3plus': (21, (513, 513), {}, None, None),
}


def stats(name: str) -> dict:
  k, (h, w), options, paper_params, paper_flops = NETWORKS[name]
  model = sj.get_model(name, num_classes=k, **options)
  x = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables['params']))
  t0 = time.perf_counter()
  compiled = jax.jit(lambda v, x: model.apply(v, x, train=False).logits).lower(
      variables, x).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {'name': name, 'classes': k, 'size': f'{h}x{w}', 'params': params,
          'gflops': cost.get('flops', float('nan')) / 1e9,
          'compile_s': time.perf_counter() - t0,
          'paper_params': paper_params or '-', 'paper_flops': paper_flops or '-'}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', default=','.join(NETWORKS))
  args = parser.parse_args()
  print(f'jax {jax.__version__}, backend {jax.default_backend()}, '
        f'{jax.devices()[0].device_kind}')
  print('| network | K | input | params | paper params | GFLOPs (XLA) | paper | compile s |')
  print('|---|---|---|---|---|---|---|---|')
  for name in args.models.split(','):
    s = stats(name)
    print(f"| {s['name']} | {s['classes']} | {s['size']} | {s['params']:,} | "
          f"{s['paper_params']} | {s['gflops']:.1f} | {s['paper_flops']} | "
          f"{s['compile_s']:.0f} |", flush=True)


if __name__ == '__main__':
  main()
