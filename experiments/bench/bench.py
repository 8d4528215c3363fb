"""Speed and memory of semseg-jax networks, optionally against PyTorch eager.

    PYTHONPATH=. python experiments/bench/bench.py \\
        --models=fcn8s,segnet,unet,pspnet --sizes=128 --batch=2 --torch \\
        --out=runs/bench/cpu

For every network and input size: train-step and inference images/s
(warm-up, then ``--repeats`` timed calls, median, ``block_until_ready``),
compile time of the train step, parameters, forward GFLOPs (XLA cost
analysis, a multiply-add = 2), and memory (XLA's compiled temp/argument
sizes; on GPU also the allocator's peak). With ``--torch`` the PyTorch twin
from ``torch_models.py`` runs in a worker process (this interpreter when it
can import torch, else ``--torch_python``) and each timed JAX call is followed
by a timed PyTorch call, so both see the same machine load; the table gives
both medians and ``torch/jax`` (> 1: JAX is faster) twice: the ratio of the
medians, and the median of the paired per-call ratios (each PyTorch call
over the JAX call just before it, which cancels a shared machine's drift).
``--memory`` adds the remat x bfloat16 memory table, ``--scaling=1,2,4,8`` the step time on that
many simulated CPU devices at a fixed per-device batch (subprocesses with
``--xla_force_host_platform_device_count``). ``--out=PREFIX`` writes
``PREFIX.json`` and ``PREFIX.md``.

Only jax, flax, optax and ``semseg_jax.models`` are imported (no trainer, no
ml_collections), so the script runs wherever the models do: ``--sizes`` takes
``H`` or ``HxW`` values or ``paper`` (each network's paper input size).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from semseg_jax import cpu_malloc
from semseg_jax import models as models_lib
from semseg_jax.models import layers

HERE = os.path.dirname(os.path.abspath(__file__))
# name: (num_classes, paper (H, W), options). PSPNet is benchmarked as the
# ResNet-50 variant (ADE20K's) that the PyTorch twin implements.
SHARED = {
    'fcn8s': (21, (500, 500), {}),
    'segnet': (11, (360, 480), {}),
    'unet': (21, (572, 572), {'feature_scale': 4}),
    'pspnet': (21, (473, 473), {'block_config': (3, 4, 6, 3)}),
}
AUX_WEIGHT = 0.4


def _network_table():
  """SHARED plus every other registered network at its paper size."""
  table = dict(SHARED)
  try:
    sys.path.insert(0, HERE)
    import model_stats  # pylint: disable=import-outside-toplevel
    for name, (k, hw, options, _, _) in model_stats.NETWORKS.items():
      table.setdefault(name, (k, hw, options))
  except ImportError:
    pass
  return table


def parse_sizes(text: str, paper: tuple[int, int]) -> list[tuple[int, int]]:
  """``'64,96x128,paper'`` -> ``[(64, 64), (96, 128), paper]``."""
  sizes = []
  for item in text.split(','):
    item = item.strip().lower()
    if item == 'paper':
      sizes.append(tuple(paper))
      continue
    try:
      hw = [int(v) for v in item.split('x')]
    except ValueError:
      raise SystemExit(f'--sizes: {item!r} is not H, HxW or paper') from None
    if len(hw) not in (1, 2) or min(hw) < 1:
      raise SystemExit(f'--sizes: {item!r} is not H, HxW or paper')
    sizes.append((hw[0], hw[-1]))
  return sizes


def timed(fn, n: int, sync=jax.block_until_ready) -> list[float]:
  """Seconds of ``n`` calls of ``fn``, each waited for with ``sync`` (its
  result's ``block_until_ready``; PyTorch's ``cuda.synchronize``)."""
  out = []
  for _ in range(n):
    t = time.perf_counter()
    sync(fn())
    out.append(time.perf_counter() - t)
  return out


# ----------------------------------------------------------------------------
# The JAX side.


def make_model(name, num_classes, options, dtype, remat):
  kw = dict(options)
  if dtype != 'float32':
    kw['dtype'] = jnp.dtype(dtype)
  if remat:
    kw['remat'] = True
  model = models_lib.get_model(name, num_classes=num_classes, **kw)
  if remat and 'remat' not in model.__dataclass_fields__:
    raise SystemExit(f'--remat: {name} has no remat option')
  return model


def loss_fn(model, params, stats, x, y, rng):
  """Pixel cross-entropy (+ 0.4 x auxiliary), float32; new batch_stats."""
  out, new_vars = model.apply({'params': params, **stats}, x, train=True,
                              mutable=['batch_stats'],
                              rngs={'dropout': rng})
  loss = optax.softmax_cross_entropy_with_integer_labels(
      out.logits.astype(jnp.float32), y).mean()
  for aux in out.aux:
    aux = layers.resize(aux.astype(jnp.float32), y.shape[1:3], 'bilinear',
                        align_corners=True)
    loss += AUX_WEIGHT * optax.softmax_cross_entropy_with_integer_labels(
        aux, y).mean()
  return loss, new_vars


def build_steps(model, x, y, mesh=None):
  """(train_step, infer_fn, state) for ``model`` on batch ``x``/``y``."""
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x,
                                           train=False))(x)
  params = variables['params']
  stats = {k: v for k, v in variables.items() if k == 'batch_stats'}
  tx = optax.sgd(1e-3, momentum=0.9)
  state = (params, stats, tx.init(params))

  def train_step(state, x, y, rng):
    params, stats, opt_state = state
    (loss, new_stats), grads = jax.value_and_grad(
        lambda p: loss_fn(model, p, stats, x, y, rng), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), new_stats, opt_state), loss

  def infer(state, x):
    params, stats, _ = state
    out = model.apply({'params': params, **stats}, x, train=False)
    return jnp.argmax(out.logits, -1)

  if mesh is not None:
    from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
    rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
    state = jax.device_put(state, rep)
    train = jax.jit(train_step, in_shardings=(rep, data, data, rep),
                    out_shardings=(rep, rep), donate_argnums=0)
  else:
    train = jax.jit(train_step, donate_argnums=0)
  return train, jax.jit(infer), state


def memory_of(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  mib = lambda b: round(b / 2**20, 1)  # noqa: E731
  return {'temp_mib': mib(m.temp_size_in_bytes),
          'args_mib': mib(m.argument_size_in_bytes),
          'out_mib': mib(m.output_size_in_bytes)}


def gflops_of(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return round(float((cost or {}).get('flops', float('nan'))) / 1e9, 2)


class TorchWorker:
  """A PyTorch timing process speaking JSON lines (torch_models._worker)."""

  def __init__(self, python: str, threads: int = 0, tune_malloc=False):
    env = dict(os.environ)
    if threads:
      env['OMP_NUM_THREADS'] = str(threads)
    if tune_malloc:  # the same glibc settings as this process
      env['SEMSEG_BENCH_MALLOC'] = os.path.abspath(cpu_malloc.__file__)
    self.proc = subprocess.Popen(
        [python, os.path.join(HERE, 'torch_models.py')], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, cwd=HERE, env=env)

  def ask(self, **req):
    self.proc.stdin.write(json.dumps(req) + '\n')
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f'torch worker died on {req}')
    return json.loads(line)

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


def torch_python(flag: str | None) -> str | None:
  """An interpreter that can import torch, or None (ratio skipped)."""
  candidates = ([flag] if flag else
                [sys.executable, '/work/torchvenv/bin/python'])
  for py in candidates:
    if py and os.path.exists(py) and subprocess.run(
        [py, '-c', 'import torch'], capture_output=True).returncode == 0:
      return py
  return None


def bench_one(name, k, hw, options, args, worker=None) -> dict:
  b = args.batch
  model = make_model(name, k, options, args.dtype, args.remat)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(b, *hw, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, k, (b, *hw)), jnp.int32)
  train, infer, state = build_steps(model, x, y)
  key = jax.random.key(1)
  t0 = time.perf_counter()
  compiled = train.lower(state, x, y, key).compile()
  compile_s = time.perf_counter() - t0
  fwd = infer.lower(state, x).compile()
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state[0]))
  rec = {'model': name, 'classes': k, 'size': f'{hw[0]}x{hw[1]}', 'batch': b,
         'dtype': args.dtype, 'remat': args.remat, 'params': n_params,
         'fwd_gflops_per_image': round(gflops_of(fwd) / b, 2),
         'compile_s': round(compile_s, 2), **memory_of(compiled)}

  holder = [state]

  def jax_train():
    holder[0], loss = compiled(holder[0], x, y, key)
    return loss

  def jax_infer():
    return fwd(holder[0], x)

  if worker is not None:
    info = worker.ask(op='setup', model=name, num_classes=k, options=options,
                      batch=b, size=list(hw), dtype=args.dtype)
    rec['torch_device'], rec['torch'] = info['device'], info['torch']
    rec['torch_malloc'] = info.get('malloc')
  for mode, fn in (('train', jax_train), ('infer', jax_infer)):
    timed(fn, args.warmup)
    use_torch = worker is not None
    if use_torch:
      reply = worker.ask(op=mode, n=args.warmup)
      if 'error' in reply:  # e.g. BatchNorm on a 1x1 map at batch 1
        rec[f'torch_{mode}_error'] = reply['error']
        print(f'torch {name} {mode}: {reply["error"]}', flush=True)
        use_torch = False
    jt, tt = [], []
    for _ in range(args.repeats):  # alternate: same load for both
      jt += timed(fn, 1)
      if use_torch:
        tt += worker.ask(op=mode, n=1)['times']
    rec[f'{mode}_ms'] = round(1e3 * statistics.median(jt), 2)
    rec[f'{mode}_img_s'] = round(b / statistics.median(jt), 2)
    rec[f'{mode}_times_ms'] = [round(1e3 * t, 2) for t in jt]
    if tt:
      rec[f'torch_{mode}_ms'] = round(1e3 * statistics.median(tt), 2)
      rec[f'torch_{mode}_times_ms'] = [round(1e3 * t, 2) for t in tt]
      rec[f'{mode}_torch_over_jax'] = round(
          statistics.median(tt) / statistics.median(jt), 2)
      # Each torch call right after its JAX call: their ratio sees the same
      # machine state, so its median resists the drift of a shared machine.
      rec[f'{mode}_torch_over_jax_paired'] = round(statistics.median(
          t / j for t, j in zip(tt, jt)), 2)
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    rec['device_peak_mib'] = round(stats['peak_bytes_in_use'] / 2**20, 1)
  return rec


def memory_table(name, k, hw, options, batch) -> list[dict]:
  """Compiled train-step memory with/without remat and bfloat16."""
  rows = []
  for dtype in ('float32', 'bfloat16'):
    for remat in (False, True):
      model = make_model(name, k, options, dtype, remat)
      xs = jax.ShapeDtypeStruct((batch, *hw, 3), jnp.float32)
      ys = jax.ShapeDtypeStruct((batch, *hw), jnp.int32)
      variables = jax.eval_shape(
          lambda x, m=model: m.init(jax.random.key(0), x, train=False), xs)
      params = variables['params']
      stats = {kk: v for kk, v in variables.items() if kk == 'batch_stats'}

      def grad(p, s, x, y, m=model):
        return jax.grad(lambda p: loss_fn(m, p, s, x, y, jax.random.key(0)),
                        has_aux=True)(p)

      compiled = jax.jit(grad).lower(params, stats, xs, ys).compile()
      # What JAX keeps for the backward pass (the VJP closure's arrays,
      # parameters included): the quantity remat controls before XLA
      # schedules and fuses.
      residuals = jax.eval_shape(
          lambda p, s, x, y, m=model: jax.tree.leaves(jax.vjp(
              lambda p: loss_fn(m, p, s, x, y, jax.random.key(0))[0], p)[1]),
          params, stats, xs, ys)
      rows.append({'model': name, 'size': f'{hw[0]}x{hw[1]}', 'batch': batch,
                   'dtype': dtype, 'remat': remat, **memory_of(compiled),
                   'residual_mib': round(sum(
                       r.size * r.dtype.itemsize for r in residuals) / 2**20,
                                         1)})
      print(json.dumps(rows[-1]), flush=True)
  return rows


def scaling_worker(args):
  """One subprocess of --scaling: step time on all local devices."""
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  n = jax.device_count()
  mesh = Mesh(np.array(jax.devices()), ('data',))
  table = _network_table()
  out = []
  for name in args.models.split(','):
    k, paper, options = table[name]
    for hw in parse_sizes(args.sizes, paper):
      model = make_model(name, k, options, args.dtype, args.remat)
      rng = np.random.default_rng(0)
      x = jnp.asarray(rng.normal(size=(n * args.batch, *hw, 3)), jnp.float32)
      y = jnp.asarray(rng.integers(0, k, (n * args.batch, *hw)), jnp.int32)
      train, _, state = build_steps(model, x, y, mesh)
      holder, key = [state], jax.random.key(1)

      def step():
        holder[0], loss = train(holder[0], x, y, key)
        return loss

      timed(step, args.warmup + 1)
      t = statistics.median(timed(step, args.repeats))
      out.append({'model': name, 'size': f'{hw[0]}x{hw[1]}', 'devices': n,
                  'per_device_batch': args.batch,
                  'step_ms': round(1e3 * t, 2),
                  'img_s': round(n * args.batch / t, 2)})
  print('SCALING ' + json.dumps(out), flush=True)


def run_scaling(args) -> list[dict]:
  rows = []
  for n in (int(v) for v in args.scaling.split(',')):
    env = dict(os.environ)
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                        f' --xla_force_host_platform_device_count={n}')
    env['JAX_PLATFORMS'] = 'cpu'
    cmd = [sys.executable, os.path.abspath(__file__), '--_scaling_worker',
           f'--models={args.models}', f'--sizes={args.sizes}',
           f'--batch={args.batch}', f'--repeats={args.repeats}',
           f'--warmup={args.warmup}', f'--dtype={args.dtype}',
           f'--malloc={args.malloc}']
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [l for l in res.stdout.splitlines() if l.startswith('SCALING ')]
    if res.returncode or not lines:
      raise RuntimeError(f'scaling run on {n} devices failed:\n{res.stderr}')
    rows += json.loads(lines[-1][len('SCALING '):])
    print(json.dumps(rows[-1]), flush=True)
  return rows


# ----------------------------------------------------------------------------
# Report.


def _pin_to_cores(n: int) -> None:
  """Runs this process (re-executed once) and its children on ``n`` cores.

  Affinity is per thread on Linux and XLA starts its thread pools at import,
  so the process restarts itself after pinning; every thread it and the
  PyTorch worker create then inherits the mask.
  """
  cpus = sorted(os.sched_getaffinity(0))
  if len(cpus) <= n:
    return
  os.sched_setaffinity(0, cpus[:n])
  os.execv(sys.executable, [sys.executable, *sys.argv])


def use_threads(n: int) -> None:
  """``n`` cores for this process (0: leave the defaults): pinned to the
  first ``n`` (:func:`_pin_to_cores`) and XLA:CPU's thread flags to match.
  Call before the first JAX computation."""
  if not n:
    return
  _pin_to_cores(n)
  # Read when the XLA:CPU client starts (first jax.devices()), so setting
  # it here, after `import jax` but before any computation, is in time.
  os.environ['XLA_FLAGS'] = (
      os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_multi_thread_eigen='
      f'{str(n > 1).lower()} intra_op_parallelism_threads={n}')


def add_host_args(p) -> None:
  """``--threads`` and ``--malloc``, which every script here applies with
  :func:`apply_host_args` before its first JAX computation."""
  p.add_argument('--threads', type=int, default=0,
                 help='CPU cores for both JAX and PyTorch (0: all, with '
                 'their default threads). Both are pinned to the '
                 "same N cores (XLA's thread flags alone do not stop its "
                 'convolutions using every core). 1 is the fair choice on a '
                 "loaded machine: OpenMP's barriers collapse when cores are "
                 'oversubscribed')
  p.add_argument('--malloc', default='tuned', choices=('tuned', 'default'),
                 help="glibc malloc for both frameworks: 'tuned' "
                 '(semseg_jax.cpu_malloc, what python -m semseg_jax.main '
                 "uses) or glibc's defaults. Untuned, XLA:CPU's step buffer "
                 "is mapped afresh each call and its element-wise loops run "
                 'at page-fault speed (RESULTS.md, attempts 25 and 50)')


def apply_host_args(args) -> None:
  """:func:`use_threads` and the malloc settings of :func:`add_host_args`'s
  flags (sets ``args.malloc_tuned``). Call before the first JAX
  computation, like XLA_FLAGS (cpu_malloc's docstring)."""
  use_threads(args.threads)
  args.malloc_tuned = (args.malloc == 'tuned'
                       and cpu_malloc.tune_cpu_malloc(strict=True))


def environment(args=None) -> dict:
  """The run's machine, versions and settings (``args``: the host flags'
  outcome, ``malloc``)."""
  dev = jax.devices()[0]
  return {
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='minutes'),
      'jax': jax.__version__, 'backend': jax.default_backend(),
      'device': dev.device_kind, 'device_count': jax.device_count(),
      'cpu_count': os.cpu_count(), 'machine': platform.machine(),
      'cpu_affinity': sorted(os.sched_getaffinity(0)),
      'python': platform.python_version(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'loadavg_start': [round(v, 2) for v in os.getloadavg()],
      'malloc': ('tuned' if getattr(args, 'malloc_tuned', False)
                 else 'default'),
  }


def env_line(env) -> str:
  """:func:`environment` as the first line of a results table."""
  return (f"{env['date']}, jax {env['jax']} on {env['backend']} "
          f"({env['device']}, {env['cpu_count']} CPUs, running on "
          f"{env['cpu_affinity']}), XLA_FLAGS=`{env['xla_flags']}`, malloc "
          f"{env['malloc']}")


def markdown(env, speed, memory, scaling) -> str:
  lines = [f"{env_line(env)}, "
           f"{'plain gradients, ' if env.get('plain_gradients') else ''}"
           f"load average {env['loadavg_start']} -> "
           f"{env.get('loadavg_end')}", '']
  if speed:
    lines += ['| network | input | batch | dtype | remat | params | GFLOPs/img '
              '| compile s | train img/s | infer img/s | temp MiB | torch '
              'train ms | jax train ms | torch/jax train | torch infer ms | '
              'jax infer ms | torch/jax infer | paired train | paired infer |',
              '|' + '---|' * 19]
    for r in speed:
      g = lambda key: r.get(key, '-')  # noqa: E731
      lines.append(
          f"| {r['model']} | {r['size']} | {r['batch']} | {r['dtype']} | "
          f"{r['remat']} | {r['params']:,} | {r['fwd_gflops_per_image']} | "
          f"{r['compile_s']} | {r['train_img_s']} | {r['infer_img_s']} | "
          f"{g('temp_mib')} | {g('torch_train_ms')} | {r['train_ms']} | "
          f"{g('train_torch_over_jax')} | {g('torch_infer_ms')} | "
          f"{r['infer_ms']} | {g('infer_torch_over_jax')} | "
          f"{g('train_torch_over_jax_paired')} | "
          f"{g('infer_torch_over_jax_paired')} |")
    lines.append('')
  if memory:
    lines += ['| network | input | batch | dtype | remat | XLA temp MiB | '
              'args MiB | JAX residuals MiB |', '|---|---|---|---|---|---|---|---|']
    lines += [f"| {r['model']} | {r['size']} | {r['batch']} | {r['dtype']} | "
              f"{r['remat']} | {r.get('temp_mib')} | {r.get('args_mib')} | "
              f"{r['residual_mib']} |" for r in memory]
    lines.append('')
  if scaling:
    lines += ['| network | input | devices | batch/device | step ms | img/s |',
              '|---|---|---|---|---|---|']
    lines += [f"| {r['model']} | {r['size']} | {r['devices']} | "
              f"{r['per_device_batch']} | {r['step_ms']} | {r['img_s']} |"
              for r in scaling]
  return '\n'.join(lines)


def add_network_args(p, models='fcn8s,unet'):
  """The flags ops.py and step_profile.py share: networks, sizes, batch and
  dtype, defaulting to the GPU set (paper sizes, batch 8, bfloat16)."""
  p.add_argument('--models', default=models)
  p.add_argument('--sizes', default='paper')
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--dtype', default='bfloat16',
                 choices=('float32', 'bfloat16'))


def write_results(prefix: str, data, md: str) -> None:
  """``PREFIX.json`` (``data``) and ``PREFIX.md`` (``md``); no-op for ''."""
  if not prefix:
    return
  os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
  with open(prefix + '.json', 'w') as f:
    json.dump(data, f, indent=1)
  with open(prefix + '.md', 'w') as f:
    f.write(md + '\n')


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--models', default='fcn8s,segnet,unet,pspnet',
                 help="comma list of registered names, or 'all'")
  p.add_argument('--sizes', default='128', help="H, HxW or 'paper', comma "
                 'separated')
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--repeats', type=int, default=10)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--dtype', default='float32',
                 choices=('float32', 'bfloat16'))
  p.add_argument('--remat', action='store_true')
  p.add_argument('--torch', action='store_true',
                 help='time the PyTorch twins too (skipped if no torch)')
  p.add_argument('--torch_python', default=None)
  p.add_argument('--memory', action='store_true',
                 help='memory table: float32/bfloat16 x remat off/on')
  p.add_argument('--no_speed', action='store_true')
  p.add_argument('--scaling', default='', help='e.g. 1,2,4,8 (CPU devices)')
  p.add_argument('--plain_gradients', action='store_true',
                 help="JAX's own convolution gradients everywhere "
                 '(layers.set_cpu_conv_gradients(False)): no CPU '
                 'formulations, and on GPU/TPU the transposed convolutions '
                 "take JAX's kernel gradient instead of the backward-filter "
                 'one (the A/B of attempt 38)')
  p.add_argument('--fast_conv', type=int, default=None,
                 help='layers.set_fast_conv_threshold (matmul weight grads)')
  add_host_args(p)
  p.add_argument('--out', default='')
  p.add_argument('--_scaling_worker', action='store_true',
                 help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  apply_host_args(args)
  if args.fast_conv is not None:
    layers.set_fast_conv_threshold(args.fast_conv)
  if args.plain_gradients:
    layers.set_cpu_conv_gradients(False)
  if args._scaling_worker:  # pylint: disable=protected-access
    return scaling_worker(args)

  table = _network_table()
  if args.models == 'all':
    args.models = ','.join(models_lib.list_models())
  names = args.models.split(',')
  for name in names:
    if name not in table and name not in models_lib.list_models():
      raise SystemExit(f'--models: unknown network {name!r}; have '
                       f'{sorted(models_lib.list_models())}')
  env = environment(args)
  env['plain_gradients'] = args.plain_gradients
  print(json.dumps(env), flush=True)

  worker = None
  if args.torch:
    py = torch_python(args.torch_python)
    if py is None:
      print('torch not importable: PyTorch ratios skipped', flush=True)
    else:
      worker = TorchWorker(py, args.threads, args.malloc_tuned)
  speed, memory = [], []
  try:
    for name in names:
      k, paper, options = table.get(name, (21, (512, 512), {}))
      for hw in parse_sizes(args.sizes, paper):
        if not args.no_speed:
          use = worker if name in SHARED else None
          speed.append(bench_one(name, k, hw, options, args, use))
          print(json.dumps(speed[-1]), flush=True)
        if args.memory:
          memory += memory_table(name, k, hw, options, args.batch)
  finally:
    if worker is not None:
      worker.close()
  scaling = run_scaling(args) if args.scaling else []
  env['loadavg_end'] = [round(v, 2) for v in os.getloadavg()]
  md = markdown(env, speed, memory, scaling)
  print(md)
  write_results(args.out, {'env': env, 'speed': speed, 'memory': memory,
                           'scaling': scaling}, md)


if __name__ == '__main__':
  main()
