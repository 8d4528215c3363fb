"""Same config, seed and device count -> the same metrics.jsonl and parameters (issue #7).

metrics.jsonl holds one timing field per log step (``train.TIMING_KEYS``,
steps per second); everything else must be equal to the last bit.
"""
import json
import os

import jax
import numpy as np

from semseg_jax import train
from testing_utils import tiny_config


def _run(workdir, **overrides):
  config = tiny_config(num_train_steps=4, eval_every_steps=100, **overrides)
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(l) for l in f]
  _, variables, _ = train.restore_variables(config, workdir)
  return records, jax.device_get(variables)


def _without_timing(records):
  return [{k: v for k, v in r.items() if k not in train.TIMING_KEYS} for r in records]


def test_two_runs_log_identical_metrics_and_parameters(tmp_path):
  records_a, variables_a = _run(str(tmp_path / 'a'))
  records_b, variables_b = _run(str(tmp_path / 'b'))
  assert [r['step'] for r in records_a] == [2, 4]
  # Timing is the only field that differs, and it is present.
  assert all(set(r) - set(s) == set() for r, s in zip(records_a, records_b))
  assert all(k in records_a[-1] for k in train.TIMING_KEYS)
  assert {'train/loss', 'train/grad_norm', 'train/skipped_steps', 'val/mean_iou'} <= set(
      records_a[-1])
  assert _without_timing(records_a) == _without_timing(records_b)
  for a, b in zip(jax.tree.leaves(variables_a), jax.tree.leaves(variables_b)):
    assert np.array_equal(a, b)
