"""The Colab notebooks in experiments/notebooks/ run top to bottom on a CPU.

Each notebook has one cell tagged ``parameters`` (papermill's convention). The
test inserts a cell after it that sets tiny values (20 steps, 32x32 images, a
U-Net of width 4..64), runs every cell in a fresh python3 kernel with nbclient
and fails on the first cell that raises. The kernel sees two CPU devices, so the
mesh and the batch split are exercised, and ``PIP_NO_INDEX`` so that a broken
install guard fails instead of reaching the network.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import pathlib
import re

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')
pytest.importorskip('matplotlib')

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / 'experiments' / 'notebooks'
NOTEBOOKS = ('quickstart_colab_tpu.ipynb', 'inference.ipynb')
CELL_TIMEOUT_S = 300

# A seconds-long U-Net run on 32x32 `shapes`; the same for both notebooks.
_TINY_MODEL = {'model.feature_scale': 16, 'dataset.num_train': 64, 'dataset.num_eval': 8,
               'log_every_steps': 5, 'num_eval_images_logged': 2}
TINY_PARAMS = {
    'quickstart_colab_tpu.ipynb': {
        'WORKDIR': 'run', 'NUM_STEPS': 20, 'IMAGE_SIZE': 32, 'BATCH_SIZE': 4,
        'EVAL_EVERY': 10, 'NUM_SHOWN': 2,
        'OVERRIDES': {**_TINY_MODEL, 'eval_batch_size': 4},
    },
    'inference.ipynb': {
        'WORKDIR': None, 'DEMO_WORKDIR': 'demo', 'DEMO_STEPS': 10, 'DEMO_IMAGE_SIZE': 32,
        'DEMO_OVERRIDES': {**_TINY_MODEL, 'batch_size': 4, 'eval_batch_size': 4},
        'OUTPUT_DIR': 'out', 'NUM_IMAGES': 3,
    },
}


def _read(name: str):
  return nbformat.read(NOTEBOOK_DIR / name, as_version=nbformat.NO_CONVERT)


def _parameters_cell(nb) -> int:
  tagged = [i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
  assert len(tagged) == 1, f'expected one cell tagged "parameters", found {len(tagged)}'
  return tagged[0]


def _assigned_names(source: str) -> set[str]:
  return {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
          for t in node.targets if isinstance(t, ast.Name)}


def _outputs(cell, kind: str) -> str:
  """Concatenated ``stdout``/``stderr`` stream text of a code cell."""
  return ''.join(o.get('text', '') for o in cell.outputs
                 if o.output_type == 'stream' and o.name == kind)


def _images(nb) -> int:
  return sum('image/png' in o.get('data', {}) for c in nb.cells if c.cell_type == 'code'
             for o in c.outputs)


def _execute(name: str, params: dict, cwd: pathlib.Path, monkeypatch):
  """Runs ``name`` with ``params`` injected after its parameters cell; returns the notebook."""
  nb = _read(name)
  index = _parameters_cell(nb)
  source = '\n'.join(f'{k} = {v!r}' for k, v in params.items())
  injected = nbformat.v4.new_code_cell(source, metadata={'tags': ['injected-parameters']})
  nb.cells.insert(index + 1, injected)
  # The kernel inherits this environment: the repository importable, CPU only, two devices.
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(filter(None, [
      str(ROOT), os.environ.get('PYTHONPATH')])))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('XLA_FLAGS', ' '.join(filter(None, [
      os.environ.get('XLA_FLAGS'), '--xla_force_host_platform_device_count=2'])))
  monkeypatch.setenv('PIP_NO_INDEX', '1')
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, startup_timeout=120,
                                   kernel_name='python3',
                                   resources={'metadata': {'path': str(cwd)}})
  client.execute()  # Raises CellExecutionError (with the traceback) when a cell fails.
  return nb


def _cell(nb, cell_id: str):
  matches = [c for c in nb.cells if c.get('id') == cell_id]
  assert len(matches) == 1, f'no cell with id {cell_id!r}'
  return matches[0]


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_is_valid_clean_and_parametrised(name):
  nb = _read(name)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  assert nb.metadata.kernelspec.name == 'python3'
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == 'code':
      assert cell.outputs == [] and cell.execution_count is None, (
          f'{name}: cell {i} ({cell.id}) was saved with outputs; clear them')
  defined = _assigned_names(nb.cells[_parameters_cell(nb)].source)
  # What the test injects must be real parameters, or it would silently run the defaults.
  assert set(TINY_PARAMS[name]) <= defined, set(TINY_PARAMS[name]) - defined
  assert 'REPO_URL' in defined


def test_quickstart_defaults_are_the_quickstart_run():
  nb = _read('quickstart_colab_tpu.ipynb')
  source = nb.cells[_parameters_cell(nb)].source
  values = {}
  exec(source, {}, values)  # pylint: disable=exec-used (our own notebook's constants)
  assert values['NUM_STEPS'] == 2000 and values['IMAGE_SIZE'] == 128
  assert values['CONFIG'] == 'quickstart' and values['DATASET'] is None


def _defined_names(module: str) -> set[str]:
  """Top-level names a module defines or imports, read from its source (no import)."""
  spec = importlib.util.find_spec(module)
  assert spec is not None and spec.origin, f'no module {module}'
  names = set()
  for node in ast.parse(pathlib.Path(spec.origin).read_text()).body:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
      names.add(node.name)
    elif isinstance(node, ast.Assign):
      names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      names |= {(a.asname or a.name).split('.')[0] for a in node.names}
  return names


def _is_submodule(module: str, name: str) -> bool:
  try:
    return importlib.util.find_spec(f'{module}.{name}') is not None
  except ModuleNotFoundError:  # `module` is not a package.
    return False


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_code_shown_in_markdown_names_real_modules_and_functions(name):
  # The markdown shows commands that the test does not run (converting torch
  # weights, preparing VOC): at least what they import and run must exist.
  text = '\n'.join(c.source for c in _read(name).cells if c.cell_type == 'markdown')
  imports = re.findall(r'^from (semseg_jax[\w.]*) import (\w+)', text, re.M)
  modules = re.findall(r'python -m (semseg_jax[\w.]*)', text)
  functions = set(re.findall(r'\bsj\.(\w+)\(', text))
  assert imports or modules or functions, 'nothing checked'
  for module, attr in imports:
    assert _is_submodule(module, attr) or attr in _defined_names(module), f'{module}.{attr}'
  for module in modules:
    spec = importlib.util.find_spec(module)
    assert spec is not None, f'python -m {module}'
    if spec.submodule_search_locations:  # A package runs its __main__.
      assert _is_submodule(module, '__main__'), f'python -m {module}: no __main__.py'
  import semseg_jax  # pylint: disable=g-import-not-at-top
  assert functions <= set(semseg_jax.__all__), functions - set(semseg_jax.__all__)


@pytest.mark.slow
def test_quickstart_notebook_trains_evaluates_and_plots(tmp_path, monkeypatch):
  name = 'quickstart_colab_tpu.ipynb'
  nb = _execute(name, TINY_PARAMS[name], tmp_path, monkeypatch)
  assert 'nothing to install' in _outputs(_cell(nb, 'install'), 'stdout')
  assert '2 cpu device(s)' in _outputs(_cell(nb, 'devices'), 'stdout')
  assert "mesh {'data': 2}" in _outputs(_cell(nb, 'devices'), 'stdout')
  config_text = _outputs(_cell(nb, 'config'), 'stdout')
  assert 'global batch 4 (2 per device), 20 steps' in config_text
  assert '64 training images' in config_text
  run = tmp_path / 'run'
  assert '20' in os.listdir(run / 'checkpoints')
  with open(run / 'metrics.jsonl') as f:
    history = [json.loads(line) for line in f]
  assert [r['step'] for r in history if 'train/loss' in r] == [5, 10, 15, 20]
  assert [r['step'] for r in history if 'val/mean_iou' in r] == [10, 20]
  report = list(run.glob('eval_step_*.json'))
  assert len(report) == 1, report
  with open(report[0]) as f:
    miou = json.load(f)['mean_iou']
  assert 0.0 <= miou <= 1.0
  evaluate_text = _outputs(_cell(nb, 'evaluate'), 'stdout')
  assert 'best checkpoint: step' in evaluate_text and 'background' in evaluate_text
  assert _images(nb) == 2  # The curves figure and the predictions figure.


@pytest.mark.slow
def test_inference_notebook_trains_a_demo_model_and_writes_predictions(tmp_path, monkeypatch):
  name = 'inference.ipynb'
  nb = _execute(name, TINY_PARAMS[name], tmp_path, monkeypatch)
  assert (tmp_path / 'demo' / 'checkpoints' / '10').is_dir()
  out = tmp_path / 'out'
  for i in range(3):
    for suffix in ('', '_overlay', '_panel'):
      assert (out / f'shapes_{i:03d}{suffix}.png').is_file(), (i, suffix)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(out / 'shapes_000.png') as label_png:
    assert label_png.mode == 'P' and label_png.size == (32, 32)
  assert 'same class map as the Predictor' in _outputs(_cell(nb, 'predict'), 'stdout')
  assert _images(nb) == 2  # The overlay grid and the written panel.


def test_switching_to_an_unprepared_voc_stops_at_the_config_cell(tmp_path, monkeypatch):
  # The notebook's VOC recipe with an empty DATA_DIR: the run must fail (a cell
  # raised) with the data module's message on how to prepare the dataset.
  empty = tmp_path / 'tfds'
  empty.mkdir()
  params = {'CONFIG': 'fcn8s', 'DATA_DIR': str(empty), 'WORKDIR': 'voc', 'NUM_STEPS': 10,
            'IMAGE_SIZE': None, 'BATCH_SIZE': 2}
  with pytest.raises(nbclient.exceptions.CellExecutionError) as error:
    _execute('quickstart_colab_tpu.ipynb', params, tmp_path, monkeypatch)
  message = str(error.value)
  assert "dataset 'voc2012' is not prepared" in message
  assert 'python -m semseg_jax.data.prepare --dataset=voc2012' in message
  assert not (tmp_path / 'voc').exists()  # Nothing was trained.
