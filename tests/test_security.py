"""No load path of ours runs code from data, checkpoints or converted weights.

The scanner parses every module under ``semseg_jax/`` (``ast``, not grep, so
comments and docstrings do not count) and rejects: pickle-family imports,
``eval``/``exec``/``compile``/``__import__``, ``yaml.load``/``unsafe_load``,
``np.load(..., allow_pickle=True)``, ``torch.load`` without a literal
``weights_only=True``, ``os.system``/``os.popen``, ``subprocess`` with
``shell=True``, and tar extraction without ``filter='data'``. Executing Python
is allowed only where it is the documented design: ``config.py`` runs config
files (they are Python, like ml_collections' ``--config``). Each rule is
itself tested on a bad snippet, so the scan cannot pass by matching nothing.
"""
from __future__ import annotations

import ast
import os
import pathlib
import pickle

import numpy as np
import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'semseg_jax'

_PICKLE_MODULES = {'pickle', 'cPickle', '_pickle', 'dill', 'cloudpickle', 'shelve', 'marshal',
                   'joblib'}
_BANNED_CALLS = {'eval', 'exec', 'compile', '__import__', 'execfile'}
# Files whose job is to execute Python written by the user (config files).
_EXEC_ALLOWED = {'config.py': {'exec_module'}}


def _dotted(node: ast.AST) -> str:
  """``a.b.c`` for an attribute chain, '' for anything else."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if isinstance(node, ast.Name):
    parts.append(node.id)
    return '.'.join(reversed(parts))
  return ''


def _keyword(call: ast.Call, name: str):
  for kw in call.keywords:
    if kw.arg == name:
      return kw.value
  return None


def _is_const(node, value) -> bool:
  return isinstance(node, ast.Constant) and node.value == value


def scan_source(source: str, filename: str = '<src>') -> list[str]:
  """Findings (``file:line: what``) for one module's source."""
  tree = ast.parse(source, filename)
  base = os.path.basename(filename)
  found = []

  def add(node, what):
    found.append(f'{filename}:{node.lineno}: {what}')

  for node in ast.walk(tree):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [node.module or ''])
      for name in names:
        if name.split('.')[0] in _PICKLE_MODULES:
          add(node, f'imports {name} (unpickling runs code)')
      if isinstance(node, ast.ImportFrom) and (node.module or '').split('.')[0] == 'pandas':
        if any(a.name == 'read_pickle' for a in node.names):
          add(node, 'imports pandas.read_pickle')
    if not isinstance(node, ast.Call):
      continue
    name = _dotted(node.func)
    leaf = name.rsplit('.', 1)[-1]
    if name in _BANNED_CALLS:
      add(node, f'calls {name}()')
    elif leaf == 'exec_module' and leaf not in _EXEC_ALLOWED.get(base, ()):
      add(node, 'executes a module (only config.py may: config files are Python)')
    elif name in ('yaml.load', 'yaml.unsafe_load', 'yaml.full_load', 'yaml.load_all'):
      add(node, f'calls {name} (use yaml.safe_load)')
    elif leaf in ('read_pickle', 'loads') and name.split('.')[0] in ('pd', 'pandas'):
      add(node, f'calls {name}')
    elif leaf == 'load' and name.split('.')[0] in ('np', 'numpy', 'jnp'):
      if not _is_const(_keyword(node, 'allow_pickle') or ast.Constant(False), False):
        add(node, f'calls {name} with allow_pickle')
    elif name == 'torch.load' and not _is_const(_keyword(node, 'weights_only'), True):
      add(node, 'calls torch.load without weights_only=True')
    elif name in ('os.system', 'os.popen', 'os.execv', 'os.execvp', 'os.spawnv'):
      add(node, f'calls {name}')
    elif name.startswith('subprocess.') and _is_const(_keyword(node, 'shell'), True):
      add(node, f'calls {name} with shell=True')
    elif leaf == 'extractall' and 'tar' in name.lower() and not _is_const(
        _keyword(node, 'filter'), 'data'):
      add(node, "extracts a tar without filter='data' (members could escape the folder)")
  return found


def test_package_sources_have_no_unsafe_load_or_exec():
  files = sorted(PACKAGE.rglob('*.py'))
  assert len(files) > 30, files  # The package was found.
  findings = [f for path in files
              for f in scan_source(path.read_text(), str(path.relative_to(PACKAGE.parent)))]
  assert not findings, '\n'.join(findings)


@pytest.mark.parametrize('snippet', [
    'import pickle',
    'from cloudpickle import loads',
    'import dill as d',
    'eval(text)',
    'exec(code)',
    'compile(src, "f", "exec")',
    'yaml.load(stream)',
    'np.load(path, allow_pickle=True)',
    'numpy.load(path, allow_pickle=flag)',
    'torch.load(path)',
    'torch.load(path, weights_only=False)',
    'os.system("ls")',
    'subprocess.run(cmd, shell=True)',
    'spec.loader.exec_module(module)',
    'tar.extractall(out)',
    'pd.read_pickle(path)',
], ids=lambda s: s.split('(')[0])
def test_scanner_flags_each_unsafe_pattern(snippet):
  assert scan_source(snippet, 'semseg_jax/data/x.py'), snippet


@pytest.mark.parametrize('snippet', [
    'np.load(path)',
    'np.load(path, allow_pickle=False)',
    'torch.load(path, map_location="cpu", weights_only=True)',
    'yaml.safe_load(stream)',
    'subprocess.run([sys.executable, "-m", "x"])',
    'tar.extractall(out, filter="data")',
    'model.eval()',  # A method named eval is not the builtin.
    '"pickle is not used"',
])
def test_scanner_accepts_safe_patterns(snippet):
  assert not scan_source(snippet, 'semseg_jax/data/x.py'), snippet


def test_config_files_are_the_one_executed_input():
  assert not scan_source('spec.loader.exec_module(module)', 'semseg_jax/config.py')


class _Payload:
  """Unpickling this creates ``path``: proof that code ran."""

  def __init__(self, path):
    self.path = str(path)

  def __reduce__(self):
    return (open, (self.path, 'w'))


def test_npz_weights_with_a_pickle_payload_are_refused_unrun(tmp_path):
  from semseg_jax.convert import resnet  # pylint: disable=g-import-not-at-top
  marker = tmp_path / 'pwned'
  payload = np.empty((), dtype=object)
  payload[()] = _Payload(marker)
  path = tmp_path / 'weights.npz'
  np.savez(path, **{'conv1.weight': payload})
  pickle.loads(pickle.dumps(_Payload(tmp_path / 'control')))  # The payload does work...
  assert (tmp_path / 'control').exists()
  with pytest.raises(ValueError, match='allow_pickle'):
    resnet.read_state_dict(str(path))
  assert not marker.exists()  # ...but reading the weights never ran it.
