"""Per-layer timings of the ops whose JAX and PyTorch forms differ most.

    PYTHONPATH=. python experiments/bench/ops.py --models=fcn8s,unet \\
        --sizes=paper --batch=8 --dtype=bfloat16 --torch --out=runs/bench/ops

The networks' own transposed convolutions, max pools, unpoolings and
convolutions, with the shapes recorded from a trace of the network at that
input size (``jax.eval_shape`` with ``layers.conv_transpose`` /
``layers.max_pool`` / ``layers.max_unpool`` / ``cpu_conv.auto_conv``
wrapped), each timed
forward and forward + backward (input and kernel gradients of
``sum(y * cotangent)``) in every formulation:

* transposed convolution: ``native`` (what ``layers.conv_transpose`` runs
  off CPU: the dilated-input convolution with the custom gradient of
  ``layers._conv_transpose_native``), ``autodiff`` (the same forward with
  JAX's own gradient), ``phases`` (the CPU form: a stride-1 convolution to
  ``s*s*O`` channels and depth-to-space), and PyTorch's ``ConvTranspose2d``;
* max pool: ``layers.max_pool`` (strided views; on CPU, windows of at
  most 4 elements with stride = window differentiate from stored offsets),
  ``reduce_window`` (XLA's ``select_and_scatter`` gradient) and
  ``F.max_pool2d``;
* max unpooling (``--ops=max_unpool``, SegNet's and ENet's):
  ``windows`` (``layers.max_unpool`` with the pool's window: selects by the
  index's offset in its window), ``scatter`` (the general form) and
  ``F.max_unpool2d``;
* batch norm (``--ops=batch_norm``, ConvBNAct's, in training, with its
  ReLU where the network has one; gradients in the input, scale and bias):
  ``written`` (``layers.batch_norm_train``'s CPU rule, attempt 44),
  ``autodiff`` (the same forward, XLA's gradient: what GPUs and TPUs run),
  ``flax`` (``flax.linen.BatchNorm`` then ``jax.nn.relu``) and
  ``F.batch_norm`` + ``F.relu``;
* convolution (``--ops=conv``, the calls of ``layers.conv``): ``xla``
  (``lax.conv_general_dilated``), ``auto`` (``cpu_conv.auto_conv``, what
  ``layers.conv`` runs: on CPU its rules, elsewhere mostly ``xla``),
  ``prepad`` (the padding
  as a separate ``jnp.pad``, then a VALID convolution), ``cols`` (im2col by
  shifted slices and one matmul, where the patches fit in 1 GiB) and
  ``nn.Conv2d``. The network's input (3 channels) gets no gradient, as in
  training.

Medians of ``--repeats`` timed calls after warm-up (``block_until_ready``,
``torch.cuda.synchronize``). Each formulation's values and gradients are
checked against the first one's. The cuDNN calls in each compiled backward
are listed (``cudnn`` column: custom-call targets, counted), which shows
whether a gradient went to cuDNN's backward-filter kernel. Runs on any
backend; PyTorch on its GPU when it has one.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import sys

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np

from semseg_jax import models as models_lib
from semseg_jax.models import cpu_conv
from semseg_jax.models import layers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # pylint: disable=wrong-import-position


def record_calls(name, k, hw, options, batch, dtype):
  """The (kind, shapes, geometry) of every transposed conv, max pool,
  unpooling, batch norm and convolution that the network ``name`` runs at
  ``hw`` in a training step's forward, in call order, deduplicated."""
  calls = []
  orig_ct, orig_mp = layers.conv_transpose, layers.max_pool
  orig_unpool = layers.max_unpool
  orig_bn = layers.batch_norm_train

  def ct(x, kernel, strides, padding, output_padding, dilation=(1, 1)):
    calls.append(('conv_transpose', tuple(x.shape), tuple(kernel.shape),
                  tuple(int(v) for v in strides),
                  tuple(int(v) for v in padding),
                  tuple(int(v) for v in output_padding),
                  tuple(int(v) for v in dilation)))
    return orig_ct(x, kernel, strides, padding, output_padding, dilation)

  def mp(x, window=2, stride=None, padding=0, ceil_mode=False):
    calls.append(('max_pool', tuple(x.shape), window,
                  window if stride is None else stride, padding, ceil_mode))
    return orig_mp(x, window, stride, padding, ceil_mode)

  def unpool(y, indices, output_hw, window=None):
    hw_out = tuple(int(v) for v in output_hw)
    k = 2 if window is None else window
    calls.append(('max_unpool', tuple(y.shape), hw_out,
                  k if isinstance(k, int) else tuple(k)))
    return orig_unpool(y, indices, output_hw, window)

  def bn(x, scale, bias, epsilon, relu=False):
    calls.append(('batch_norm', tuple(x.shape), float(epsilon), bool(relu)))
    return orig_bn(x, scale, bias, epsilon, relu)

  orig_conv = cpu_conv.auto_conv

  def conv(lhs, rhs, window_strides, padding, **kw):
    pads = padding
    if isinstance(padding, str):
      pads = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2],
                                     window_strides, padding)
    plain = (tuple(kw.get('lhs_dilation') or (1, 1)) == (1, 1)
             and kw.get('feature_group_count', 1) == 1)
    if plain:
      calls.append(('conv', tuple(lhs.shape), tuple(rhs.shape),
                    tuple(int(v) for v in window_strides),
                    tuple((int(lo), int(hi)) for lo, hi in pads),
                    tuple(int(v) for v in kw.get('rhs_dilation') or (1, 1))))
    return orig_conv(lhs, rhs, window_strides, padding, **kw)

  model = bench.make_model(name, k, options, dtype, False)
  layers.conv_transpose, layers.max_pool = ct, mp
  layers.max_unpool, layers.batch_norm_train = unpool, bn
  cpu_conv.auto_conv = conv
  key = jax.random.key(0)
  try:  # training mode: batch norm on the batch's statistics
    jax.eval_shape(
        lambda x: model.init({'params': key, 'dropout': key}, x, train=True),
        jax.ShapeDtypeStruct((batch, *hw, 3), jnp.float32))
  finally:
    layers.conv_transpose, layers.max_pool = orig_ct, orig_mp
    layers.max_unpool, layers.batch_norm_train = orig_unpool, orig_bn
    cpu_conv.auto_conv = orig_conv
  seen, out = set(), []
  for c in calls:
    if c not in seen:
      seen.add(c)
      out.append(c)
  return out


def _cudnn_calls(compiled) -> str:
  targets = re.findall(r'custom_call_target="([^"]*cudnn[^"]*)"',
                       compiled.as_text())
  names = collections.Counter(t.split('$')[-1] for t in targets)
  return ' '.join(f'{n}x{c}' for n, c in sorted(names.items())) or '-'


def _median_ms(fn, warmup, repeats, sync=jax.block_until_ready):
  bench.timed(fn, warmup, sync)
  return round(1e3 * statistics.median(bench.timed(fn, repeats, sync)), 3)


def _rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _jax_forms(call):
  """name -> f(x, kernel) for a recorded call (the op's JAX forms)."""
  if call[0] == 'conv_transpose':
    _, _, _, s, p, op, d = call
    forms = {
        'native': lambda x, w: layers._conv_transpose_native(x, w, s, p, op),  # pylint: disable=protected-access
        'autodiff': lambda x, w: layers._conv_transpose_lhs_dilated(  # pylint: disable=protected-access
            x, w, s, p, op, d),
        'phases': lambda x, w: layers._conv_transpose_phases(x, w, s, p, op),  # pylint: disable=protected-access
    }
    if d != (1, 1) or any(o >= st for o, st in zip(op, s)):
      forms.pop('native')
      forms.pop('phases')
    return forms
  if call[0] == 'conv':
    _, xs, ks, s, pads, d = call

    def xla(x, w):
      return jax.lax.conv_general_dilated(
          x, w, s, pads, rhs_dilation=d,
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

    def auto(x, w):  # what layers.conv runs (cpu_conv's rules on CPU)
      return cpu_conv.auto_conv(
          x, w, s, pads, rhs_dilation=d,
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

    forms = {'xla': xla, 'auto': auto}
    if any(v for pair in pads for v in pair):
      def prepad(x, w):
        xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
        return jax.lax.conv_general_dilated(
            xp, w, s, 'VALID', rhs_dilation=d,
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      forms['prepad'] = prepad
    out = jax.eval_shape(xla, jax.ShapeDtypeStruct(xs, jnp.bfloat16),
                         jax.ShapeDtypeStruct(ks, jnp.bfloat16)).shape
    cols_bytes = 2 * np.prod(out[:3]) * np.prod(ks[:3])
    if ks[:2] != (1, 1) and s == (1, 1) and cols_bytes <= 2**30:
      def cols(x, w):  # the off-CPU rule's im2col form (attempt 39)
        return cpu_conv._fwd_cols(x, w, pads, d)  # pylint: disable=protected-access
      forms['cols'] = cols
    return forms
  if call[0] == 'batch_norm':
    _, _, eps, relu = call
    ref = flax_nn.BatchNorm(use_running_average=False, epsilon=eps)
    act = jax.nn.relu if relu else (lambda y: y)

    def flax_bn(x, w):
      y, _ = ref.apply({'params': {'scale': w[0], 'bias': w[1]},
                        'batch_stats': {'mean': jnp.zeros_like(w[0]),
                                        'var': jnp.ones_like(w[0])}},
                       x, mutable=['batch_stats'])
      return act(y)

    return {
        'written': lambda x, w: layers._bn_train_vjp(  # pylint: disable=protected-access
            x, w[0], w[1], eps, relu)[0],
        'autodiff': lambda x, w: layers._bn_forward(  # pylint: disable=protected-access
            x, w[0], w[1], eps, relu)[0][0],
        'flax': flax_bn,
    }
  if call[0] == 'max_unpool':
    hw_out, k = call[2], call[3]
    return {
        'windows': lambda y, i: layers.max_unpool(y, i, hw_out, window=k),
        'scatter': lambda y, i: layers.max_unpool(y, i, hw_out),
    }
  _, _, window, stride, padding, ceil_mode = call

  def reduce_window(x, _):
    kk, ss, pp, _, hi = layers._pool_geometry(  # pylint: disable=protected-access
        x.shape[1:3], window, stride, padding, ceil_mode)
    return jax.lax.reduce_window(
        x, np.array(-np.inf, x.dtype), jax.lax.max, (1, *kk, 1),
        (1, *ss, 1), ((0, 0), (pp[0], hi[0]), (pp[1], hi[1]), (0, 0)))

  return {
      'max_pool': lambda x, _: layers.max_pool(x, window, stride, padding,
                                               ceil_mode),
      'reduce_window': reduce_window,
  }


def _unpool_inputs(call):
  """Pooled values and their indices for a recorded ``max_unpool`` call:
  the non-overlapping pool of a random map of the unpooled size."""
  _, ys, (hh, ww), k = call
  x = jax.random.normal(jax.random.key(0), (ys[0], hh, ww, ys[3]))
  kk = (k, k) if isinstance(k, int) else k
  y, idx = layers.max_pool_with_argmax(
      x, k, k, ceil_mode=ys[1] * kk[0] > hh or ys[2] * kk[1] > ww)
  assert y.shape == ys, (y.shape, ys)
  return y, idx


def _torch_fn(call, dtype, torch_mod):
  """(forward, forward + backward) closures of PyTorch's op, or None."""
  torch, F = torch_mod
  dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  amp = dtype == 'bfloat16'
  g = torch.Generator(device='cpu').manual_seed(0)
  if call[0] == 'conv_transpose':
    _, xs, ks, s, p, op, d = call
    mod = torch.nn.ConvTranspose2d(ks[2], ks[3], ks[:2], s, p, op,
                                   bias=False, dilation=d).to(dev)
    x = torch.randn(xs[0], xs[3], xs[1], xs[2], generator=g).to(dev)
    mod = mod.to(memory_format=torch.channels_last)
    fwd = lambda x: mod(x)  # noqa: E731
  elif call[0] == 'conv':
    _, xs, ks, s, pads, d = call
    if any(lo != hi for lo, hi in pads):
      return None
    mod = torch.nn.Conv2d(ks[2], ks[3], ks[:2], s, [lo for lo, _ in pads],
                          d).to(dev).to(memory_format=torch.channels_last)
    x = torch.randn(xs[0], xs[3], xs[1], xs[2], generator=g).to(dev)
    fwd = lambda x: mod(x)  # noqa: E731
  elif call[0] == 'batch_norm':
    _, xs, eps, relu = call
    x = torch.randn(xs[0], xs[3], xs[1], xs[2], generator=g).to(dev)
    sb = torch.stack([1 + torch.rand(xs[3], generator=g),
                      torch.randn(xs[3], generator=g)]).to(dev)
    sb.requires_grad_(True)
    act = F.relu if relu else (lambda y: y)
    fwd = lambda x: act(F.batch_norm(  # noqa: E731
        x, None, None, sb[0], sb[1], training=True, eps=eps))
  elif call[0] == 'max_unpool':
    _, ys, hw_out, k = call
    pooled, idx = _unpool_inputs(call)
    x = torch.from_numpy(np.asarray(pooled, np.float32)).permute(
        0, 3, 1, 2).contiguous().to(dev, torch.bfloat16 if amp else None)
    idx = torch.from_numpy(np.asarray(idx, np.int64)).permute(
        0, 3, 1, 2).contiguous().to(dev)
    fwd = lambda x: F.max_unpool2d(x, idx, k, k,  # noqa: E731
                                   output_size=hw_out)
  else:
    _, xs, window, stride, padding, ceil_mode = call
    x = torch.randn(xs[0], xs[3], xs[1], xs[2], generator=g).to(dev)
    fwd = lambda x: F.max_pool2d(x, window, stride, padding,  # noqa: E731
                                 ceil_mode=ceil_mode)
  # The network's input (3 channels) needs no gradient, as in training.
  if call[0] != 'max_unpool':  # torch's unpooling wants contiguous NCHW
    x = x.to(memory_format=torch.channels_last)
  x = x.requires_grad_(
      not (call[0] == 'conv' and call[1][3] == 3))
  with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16, enabled=amp):
    cot = torch.randn_like(fwd(x).float())

  def forward():
    with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16,
                                         enabled=amp):
      return fwd(x)

  def backward():
    with torch.autocast(dev.type, torch.bfloat16, enabled=amp):
      y = fwd(x)
    (y.float() * cot).sum().backward()
    return y

  def sync(_):
    if dev.type == 'cuda':
      torch.cuda.synchronize()

  return forward, backward, sync


def bench_call(call, dtype, args, torch_mod=None) -> dict:
  rng = np.random.default_rng(0)
  dt = jnp.dtype(dtype)
  x = jnp.asarray(rng.normal(size=call[1]), dt)
  if call[0] in ('conv_transpose', 'conv'):
    w = jnp.asarray(rng.normal(size=call[2]) / np.sqrt(np.prod(call[2][:3])),
                    dt)
    geo = (f's{call[3]} p{call[4]} op{call[5]} d{call[6]}'
           if call[0] == 'conv_transpose' else
           f's{call[3]} p{call[4]} d{call[5]}')
    desc = f'{call[1]} -> k{call[2]}'
  elif call[0] == 'batch_norm':
    c = call[1][3]
    w = jnp.asarray(np.stack([1 + rng.random(c), rng.normal(size=c)]),
                    jnp.float32)  # scale and bias, float32 as in the layers
    geo = f'eps={call[2]} relu={call[3]}'
    desc = f'{call[1]}'
  elif call[0] == 'max_unpool':
    x, w = _unpool_inputs(call)
    x = x.astype(dt)
    geo = f'k{call[3]} -> {call[2]}'
    desc = f'{call[1]}'
  else:
    w = jnp.zeros((), dt)
    geo = f'k{call[2]} s{call[3]} p{call[4]} ceil={call[5]}'
    desc = f'{call[1]}'
  rec = {'op': call[0], 'input': desc, 'geometry': geo, 'dtype': dtype,
         'forms': {}}
  ref = cot = None
  for form, f in _jax_forms(call).items():
    if cot is None:  # one cotangent for every form: gradients comparable
      cot = jnp.asarray(rng.normal(size=jax.eval_shape(f, x, w).shape), dt)
    fwd = jax.jit(f)
    # Input and kernel gradients; the network's input (3 channels) needs
    # none, as in training.
    argnums = {'conv_transpose': (0, 1), 'max_pool': (0,),
               'max_unpool': (0,), 'batch_norm': (0, 1),
               'conv': (1,) if call[1][3] == 3 else (0, 1)}[call[0]]
    grad = jax.jit(jax.grad(
        lambda x, w, c, f=f: jnp.sum((f(x, w) * c).astype(jnp.float32)),
        argnums))
    compiled = grad.lower(x, w, cot).compile()
    vals = (fwd(x, w), *grad(x, w, cot))
    errs = ([] if ref is None else
            [round(_rel_err(a, b), 6) for a, b in zip(vals, ref)])
    ref = ref or vals
    rec['forms'][form] = {
        'fwd_ms': _median_ms(lambda: fwd(x, w), args.warmup, args.repeats),
        'fwd_bwd_ms': _median_ms(lambda: compiled(x, w, cot), args.warmup,
                                 args.repeats),
        'cudnn_bwd': _cudnn_calls(compiled),
        'rel_err_vs_first': errs}
  fns = None if torch_mod is None else _torch_fn(call, dtype, torch_mod)
  if fns is not None:
    fwd_t, bwd_t, sync = fns
    rec['forms']['torch'] = {
        'fwd_ms': _median_ms(fwd_t, args.warmup, args.repeats, sync),
        'fwd_bwd_ms': _median_ms(bwd_t, args.warmup, args.repeats, sync)}
  return rec


def markdown(env, rows) -> str:
  lines = [f"{bench.env_line(env)}, torch {env.get('torch', '-')}", '',
           '| network | op | input | geometry | dtype | form | fwd ms | '
           'fwd+bwd ms | cuDNN calls in fwd+bwd | rel. err vs first |',
           '|' + '---|' * 10]
  for r in rows:
    for form, v in r['forms'].items():
      lines.append(
          f"| {r['model']} | {r['op']} | {r['input']} | {r['geometry']} | "
          f"{r['dtype']} | {form} | {v['fwd_ms']} | {v['fwd_bwd_ms']} | "
          f"{v.get('cudnn_bwd', '-')} | {v.get('rel_err_vs_first', '-')} |")
  return '\n'.join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  bench.add_network_args(p)
  p.add_argument('--ops', default='conv_transpose,max_pool',
                 help='which recorded ops to time (conv_transpose, max_pool, '
                 'max_unpool, batch_norm, conv)')
  p.add_argument('--repeats', type=int, default=20)
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--torch', action='store_true',
                 help="time PyTorch's op in this process (needs torch)")
  bench.add_host_args(p)
  p.add_argument('--out', default='')
  args = p.parse_args(argv)
  bench.apply_host_args(args)
  torch_mod = None
  env = bench.environment(args)
  if args.torch:
    try:
      import torch  # pylint: disable=import-outside-toplevel
      import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
    except ImportError:
      print('torch not importable: PyTorch rows skipped', flush=True)
    else:
      torch_mod = (torch, F)
      env['torch'] = torch.__version__
      if args.threads:
        torch.set_num_threads(args.threads)
  print(json.dumps(env), flush=True)
  table = bench._network_table()  # pylint: disable=protected-access
  ops = set(args.ops.split(','))
  rows = []
  for name in args.models.split(','):
    k, paper, options = table[name]
    for hw in bench.parse_sizes(args.sizes, paper):
      for call in record_calls(name, k, hw, options, args.batch, args.dtype):
        if call[0] not in ops:
          continue
        rec = {'model': name, 'size': f'{hw[0]}x{hw[1]}',
               **bench_call(call, args.dtype, args, torch_mod)}
        rows.append(rec)
        print(json.dumps(rec), flush=True)
  md = markdown(env, rows)
  print(md)
  bench.write_results(args.out, {'env': env, 'rows': rows}, md)


if __name__ == '__main__':
  main()
