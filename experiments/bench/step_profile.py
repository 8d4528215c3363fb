"""Where a train step's (or ``--infer``: inference's) device time goes.

    PYTHONPATH=. python experiments/bench/step_profile.py --models=fcn8s,unet \\
        --sizes=paper --batch=8 --dtype=bfloat16 --out=runs/bench/profile

Builds the same train step as ``bench.py`` (so a persistent compilation
cache set with ``JAX_COMPILATION_CACHE_DIR`` is hit after a bench run),
runs ``--steps`` steps under ``jax.profiler.trace`` and sums the device's
events by name from the trace's ``*.trace.json.gz``: the top ``--top``
events of each of the ``--lines`` busiest trace lines (a GPU's streams,
its "XLA Ops" line named by HLO instruction), with their share of that
line's time, per step. On a CPU the events are XLA:CPU's thunks
(``--device=/host:CPU``).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # pylint: disable=wrong-import-position


def device_lines(trace: dict, device: str) -> dict[str, list[dict]]:
  """Complete events of the processes whose name contains ``device``, by
  trace line (thread name: a GPU's streams, its "XLA Ops" and "XLA
  Modules" lines, which overlap, so each line is summed on its own)."""
  meta = [e for e in trace.get('traceEvents', []) if e.get('ph') == 'M']
  pids = {e['pid'] for e in meta if e.get('name') == 'process_name'
          and device in str(e.get('args', {}).get('name', ''))}
  threads = {(e['pid'], e.get('tid')): str(e.get('args', {}).get('name', ''))
             for e in meta if e.get('name') == 'thread_name'}
  lines = collections.defaultdict(list)
  for e in trace.get('traceEvents', []):
    if e.get('ph') == 'X' and e.get('pid') in pids and 'dur' in e:
      tname = threads.get((e['pid'], e.get('tid')), str(e.get('tid')))
      lines[f"{e['pid']}/{tname}"].append(e)
  return lines


def summarize(events, steps: int, top: int) -> dict:
  by_name = collections.defaultdict(lambda: [0.0, 0])
  args = {}  # the first event's arguments per name (its HLO op, if given)
  for e in events:
    rec = by_name[e['name']]
    rec[0] += float(e['dur'])
    rec[1] += 1
    args.setdefault(e['name'], e.get('args') or {})
  total = sum(v[0] for v in by_name.values())
  rows = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
  return {'ms_per_step': round(total / 1e3 / steps, 3),
          'events_per_step': round(sum(v[1] for v in by_name.values())
                                   / steps, 1),
          'top': [{'name': n[:160], 'ms_per_step': round(t / 1e3 / steps, 3),
                   'share': round(t / max(total, 1e-9), 4),
                   'calls_per_step': round(c / steps, 1),
                   'args': {k: str(v)[:300] for k, v in args[n].items()}}
                  for n, (t, c) in rows]}


def profile_one(name, k, hw, options, args) -> dict:
  model = bench.make_model(name, k, options, args.dtype, False)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(args.batch, *hw, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, k, (args.batch, *hw)), jnp.int32)
  train, infer, state = bench.build_steps(model, x, y)
  key = jax.random.key(1)
  if args.infer:
    compiled = infer.lower(state, x).compile()
    step = lambda state: (state, compiled(state, x))  # noqa: E731
  else:
    compiled = train.lower(state, x, y, key).compile()
    step = lambda state: compiled(state, x, y, key)  # noqa: E731
  for _ in range(3):
    state, out = step(state)
  jax.block_until_ready(out)
  log_dir = tempfile.mkdtemp(prefix='semseg_profile_')
  with jax.profiler.trace(log_dir):
    for _ in range(args.steps):
      state, out = step(state)
    jax.block_until_ready(out)
  mode = 'infer' if args.infer else 'train'
  if args.out:  # the program, to look up the events' HLO instructions
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(f'{args.out}.{name}_{hw[0]}x{hw[1]}_{mode}.hlo.txt', 'w',
              encoding='utf-8') as f:
      f.write(compiled.as_text())
  files = glob.glob(os.path.join(log_dir, '**', '*.trace.json.gz'),
                    recursive=True)
  if not files:
    raise SystemExit(f'no *.trace.json.gz under {log_dir}')
  with gzip.open(max(files, key=os.path.getmtime), 'rb') as f:
    trace = json.load(f)
  lines = device_lines(trace, args.device)
  summaries = {line: summarize(ev, args.steps, args.top)
               for line, ev in lines.items()}
  busiest = sorted(summaries, key=lambda l: -summaries[l]['ms_per_step'])
  return {'model': name, 'mode': mode, 'size': f'{hw[0]}x{hw[1]}',
          'batch': args.batch,
          'dtype': args.dtype, 'steps': args.steps,
          'lines': {l: summaries[l] for l in busiest[:args.lines]}}


def markdown(env, rows) -> str:
  out = [bench.env_line(env), '']
  for r in rows:
    for line, v in r['lines'].items():
      out += [f"{r['model']} {r['mode']} {r['size']} batch "
              f"{r['batch']} {r['dtype']}, "
              f"line `{line}`: {v['ms_per_step']} ms of events per step, "
              f"{v['events_per_step']} events", '',
              '| event | ms/step | share | calls/step |', '|---|---|---|---|']
      out += [f"| `{t['name']}` | {t['ms_per_step']} | {t['share']:.1%} | "
              f"{t['calls_per_step']} |" for t in v['top']]
      out.append('')
  return '\n'.join(out)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  bench.add_network_args(p)
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--top', type=int, default=25)
  p.add_argument('--lines', type=int, default=3,
                 help='trace lines (streams, XLA Ops, ...) reported, '
                 'busiest first')
  p.add_argument('--device', default='/device:GPU',
                 help="trace processes to sum ('/host:CPU' on a CPU)")
  p.add_argument('--infer', action='store_true',
                 help='profile the inference function instead of the train '
                 'step')
  p.add_argument('--out', default='',
                 help='results prefix (.json, .md; and the compiled '
                 'programs as .<model>_<size>_<mode>.hlo.txt)')
  bench.add_host_args(p)
  args = p.parse_args(argv)
  bench.apply_host_args(args)
  env = bench.environment(args)
  print(json.dumps(env), flush=True)
  table = bench._network_table()  # pylint: disable=protected-access
  rows = []
  for name in args.models.split(','):
    k, paper, options = table[name]
    for hw in bench.parse_sizes(args.sizes, paper):
      rows.append(profile_one(name, k, hw, options, args))
      print(json.dumps(rows[-1]), flush=True)
  md = markdown(env, rows)
  print(md)
  bench.write_results(args.out, {'env': env, 'rows': rows}, md)


if __name__ == '__main__':
  main()
