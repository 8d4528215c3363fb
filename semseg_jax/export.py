"""Export the eval-mode network so it runs without the Python model code.

Three formats, each written with a ``<name>.json`` beside it that describes the
input (name, shape, dtype), the normalisation and the class names:

* ``stablehlo`` (``model.stablehlo``): ``jax.export`` serialisation, lowered
  for CPU, CUDA and TPU; the batch is polymorphic by default. Reload it with
  :func:`load_stablehlo` (needs only ``jax``).
* ``onnx`` (``model.onnx``, ``[onnx]`` extra): converted with jax2onnx and run
  with onnxruntime (:func:`load_onnx`).
* ``savedmodel`` (``savedmodel/``, ``[tf]`` extra): jax2tf, for TF Serving /
  TFLite tooling. TensorFlow is imported only by :func:`export_savedmodel`.

Two functions can be exported (``output``):

* ``'logits'``: float32 ``[B, H, W, 3]`` normalised image -> float32
  ``[B, H, W, K]`` logits, exactly ``model.apply(v, x, train=False).logits``.
* ``'labels'``: uint8 ``[B, H, W, 3]`` RGB -> uint8 ``[B, H, W]`` class ids
  (normalisation and argmax inside), the convenient one to deploy.

The weights are constants of the StableHLO module and initialisers of the
ONNX graph, so an artifact is self-contained.

Spatial size: ``size=None`` asks for a polymorphic ``32*h x 32*w`` input (any
multiple of 32). The networks of this library compute index tables from the
input size in Python (pooling with argmax, ceil-mode pooling, crops), so most
of them need a concrete size; then the export falls back to ``fallback_size``
and says so (logged, and recorded in the JSON under ``"note"``). ONNX always
needs a fixed spatial size; its polymorphic batch is a ``Loop`` over the
images of the batch (one image at a time: a fixed batch runs ~4x faster,
7 ms against 27 ms for 3 images of 64x64 through a tiny PSPNet on CPU).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import itertools
import json
import os
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

FORMATS = ('stablehlo', 'onnx', 'savedmodel')
OUTPUTS = ('logits', 'labels')
ARTIFACTS = {'stablehlo': 'model.stablehlo', 'onnx': 'model.onnx', 'savedmodel': 'savedmodel'}
# Lowered for every platform so an artifact written on a laptop serves on GPU or TPU.
DEFAULT_PLATFORMS = ('cpu', 'cuda', 'tpu')
# Polymorphic spatial sizes are multiples of this (five stride-2 stages).
SPATIAL_MULTIPLE = 32
INPUT_NAME = 'image'


class ExportError(ValueError):
  """The network or the request cannot be exported; the message says why."""


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """What an exported function takes.

  Attributes:
    batch: images per call, or None for any number.
    size: ``(H, W)``, or None for any multiple of ``SPATIAL_MULTIPLE``.
    output: 'logits' (float32 normalised input) or 'labels' (uint8 RGB input).
  """
  batch: int | None
  size: tuple[int, int] | None
  output: str = 'logits'

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(np.uint8 if self.output == 'labels' else np.float32)

  def shape_str(self) -> str:
    """``'b, 32*h, 32*w, 3'``-style spec for ``jax.export.symbolic_shape``."""
    b = 'b' if self.batch is None else str(self.batch)
    if self.size is None:
      return f'{b}, {SPATIAL_MULTIPLE}*h, {SPATIAL_MULTIPLE}*w, 3'
    return f'{b}, {self.size[0]}, {self.size[1]}, 3'

  def abstract(self) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(jax.export.symbolic_shape(self.shape_str()), self.dtype)

  def json_shape(self) -> list[Any]:
    """The input shape with None for free dimensions (ONNX/TF convention)."""
    hw = [None, None] if self.size is None else list(self.size)
    return [self.batch, *hw, 3]


def _check_spec(spec: InputSpec) -> None:
  if spec.output not in OUTPUTS:
    raise ExportError(f'output={spec.output!r} must be one of {", ".join(OUTPUTS)}')
  if spec.batch is not None and (not isinstance(spec.batch, int) or spec.batch <= 0):
    raise ExportError(f'batch={spec.batch!r} must be a positive integer or None (polymorphic)')
  if spec.size is not None and (len(spec.size) != 2 or any(
      not isinstance(s, int) or s <= 0 for s in spec.size)):
    raise ExportError(f'size={spec.size!r} must be (H, W) positive integers or None')


# ------------------------------------------------------------ the functions


def inference_fn(model, variables: dict[str, Any], output: str = 'logits', *,
                 mean: Sequence[float] = (0.0, 0.0, 0.0),
                 std: Sequence[float] = (1.0, 1.0, 1.0),
                 bgr: bool = False) -> Callable[[jax.Array], jax.Array]:
  """The function an artifact holds, with ``variables`` closed over (constants).

  Args:
    model: a Flax module following the model contract (``train=False`` path).
    variables: ``{'params': ..., 'batch_stats': ...}``.
    output: 'logits': float32 ``[B, H, W, 3]`` normalised -> float32
      ``[B, H, W, K]``; 'labels': uint8 ``[B, H, W, 3]`` RGB -> uint8
      ``[B, H, W]`` class ids, normalised with ``mean``/``std`` (0-255 units,
      in the network's channel order; ``bgr``: the network takes BGR, as
      ``data.transforms.Normalization`` describes it).
  """
  if output not in OUTPUTS:
    raise ExportError(f'output={output!r} must be one of {", ".join(OUTPUTS)}')
  variables = jax.tree.map(jnp.asarray, variables)

  def logits(x):
    return model.apply(variables, x, train=False).logits.astype(jnp.float32)

  if output == 'logits':
    return logits
  mean_c = np.asarray(mean, np.float32)
  std_c = np.asarray(std, np.float32)

  def labels(image):
    if bgr:
      image = image[..., ::-1]
    x = (image.astype(jnp.float32) - mean_c) * (np.float32(1) / std_c)
    return jnp.argmax(logits(x), axis=-1).astype(jnp.uint8)

  return labels


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0] if text else ""}'


def trace(fn: Callable, spec: InputSpec, fallback_size: tuple[int, int] | None,
          what: str = 'the network') -> tuple[InputSpec, str | None]:
  """The spec ``fn`` can be traced at: ``spec``, or fixed at ``fallback_size``.

  Returns ``(spec, note)``; ``note`` explains a fallback (None when there was
  none). Raises :class:`ExportError` when ``fn`` cannot be traced at all.
  """
  _check_spec(spec)
  try:
    jax.eval_shape(fn, spec.abstract())
    return spec, None
  except Exception as e:  # pylint: disable=broad-except (shape polymorphism fails many ways)
    if spec.size is not None:
      hint = ' (try a fixed --export_batch=N)' if spec.batch is None else ''
      raise ExportError(f'cannot trace {what} at input [{spec.shape_str()}]{hint}: '
                        f'{_first_line(e)}') from e
    reason = _first_line(e)
  if fallback_size is None:
    raise ExportError(f'{what} cannot take a polymorphic spatial size ({reason}); '
                      'give a fixed size (--export_size=H,W)')
  fixed = dataclasses.replace(spec, size=tuple(int(s) for s in fallback_size))
  note = (f'{what} cannot take a polymorphic spatial size ({reason}); exported at the '
          f'fixed size {fixed.size[0]}x{fixed.size[1]} instead (--export_size=H,W picks another)')
  logging.warning(note)
  return trace(fn, fixed, None, what)[0], note


# --------------------------------------------------------------- StableHLO


def export_stablehlo(fn: Callable, spec: InputSpec, path: str,
                     platforms: Sequence[str] = DEFAULT_PLATFORMS) -> jax.export.Exported:
  """Serialises ``fn`` at ``spec`` (a traceable spec, see :func:`trace`) to ``path``."""
  abstract = spec.abstract()
  try:
    exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(abstract)
  except Exception as e:  # pylint: disable=broad-except
    # A platform-specific lowering can be missing; the local backend always works.
    local = jax.default_backend()
    if tuple(platforms) == (local,):
      raise ExportError(f'jax.export failed: {_first_line(e)}') from e
    logging.warning('lowering for %s failed (%s); exporting for %s only', platforms,
                    _first_line(e), local)
    exported = jax.export.export(jax.jit(fn), platforms=(local,))(abstract)
  with open(path, 'wb') as f:
    f.write(exported.serialize())
  return exported


def load_stablehlo(path: str) -> Callable[[Any], jax.Array]:
  """A jitted callable running the artifact at ``path`` (no model code needed).

  The callable takes the array the artifact was exported for (see its JSON)
  and returns a ``jax.Array``; ``.exported`` is the ``jax.export.Exported``.
  """
  if os.path.isdir(path):
    path = os.path.join(path, ARTIFACTS['stablehlo'])
  try:
    with open(path, 'rb') as f:
      exported = jax.export.deserialize(bytearray(f.read()))
  except FileNotFoundError:
    raise FileNotFoundError(f'no StableHLO artifact at {path}') from None
  except Exception as e:  # pylint: disable=broad-except (flatbuffer errors vary)
    raise ExportError(f'{path} is not a jax.export artifact: {_first_line(e)}') from None
  call = jax.jit(exported.call)

  def run(x):
    return call(x)

  run.exported = exported
  return run


# -------------------------------------------------------------------- ONNX

# jax2onnx's import replaces some jax.numpy functions for good (0.17.1:
# jnp.cumsum); these modules' attributes are put back after each use.
_PATCHABLE = ('jax.numpy', 'jax.lax', 'jax.nn', 'jax.image', 'flax.linen')


@contextlib.contextmanager
def _restore_module_attrs():
  modules = [importlib.import_module(m) for m in _PATCHABLE]
  saved = [dict(vars(m)) for m in modules]
  try:
    yield
  finally:
    for module, attrs in zip(modules, saved):
      for name, value in attrs.items():
        if vars(module).get(name) is not value:
          setattr(module, name, value)


def _import_onnx():
  """jax2onnx, onnxruntime and jax2onnx's plugin registry, loaded once."""
  try:
    with _restore_module_attrs():
      import jax2onnx  # pylint: disable=g-import-not-at-top
      import onnxruntime  # pylint: disable=g-import-not-at-top
      from jax2onnx.plugins import plugin_system  # pylint: disable=g-import-not-at-top
      _import_primitive_plugins(plugin_system)
  except ImportError as e:
    raise ExportError(f'ONNX export needs the [onnx] extra (pip install semseg-jax[onnx]): '
                      f'{e}') from None
  return jax2onnx, onnxruntime, plugin_system


def _import_primitive_plugins(plugin_system) -> None:
  """Loads only jax2onnx's JAX-primitive plugins.

  We hand jax2onnx a function of JAX primitives (see :func:`export_onnx`), so
  its Flax/Equinox/dm-pix plugins and examples are never used; importing
  them all (``import_all_plugins``) takes 4x longer (15 s against 4 s on a
  loaded 2-core machine). Falls back to importing everything if jax2onnx's
  layout changes.
  """
  if getattr(plugin_system, '_already_imported_plugins', True):
    return
  import_tree = getattr(plugin_system, '_import_tree', None)
  root = os.path.join(os.path.dirname(plugin_system.__file__), 'jax')
  if import_tree is None or not os.path.isdir(root):
    plugin_system.import_all_plugins()
    return
  import pathlib  # pylint: disable=g-import-not-at-top
  import_tree(pathlib.Path(root), 'jax2onnx.plugins.jax')
  plugin_system._already_imported_plugins = True  # pylint: disable=protected-access


def _walk(jaxpr) -> Any:
  """Every equation of ``jaxpr`` and of the jaxprs inside its equations."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jex.core.jaxprs_in_params(eqn.params):
      yield from _walk(sub)


def _where(eqn) -> str:
  """' at file.py:123 (function)', the user code that emitted ``eqn``, or ''."""
  try:
    return f' at {jex.source_info_util.summarize(eqn.source_info)}'
  except Exception:  # pylint: disable=broad-except (best-effort location)
    return ''


def _max_pool_by_slices(x, *, window_dimensions, window_strides, padding, base_dilation,
                        window_dilation):
  """``reduce_window_max`` as a max over strided slices (exact).

  jax2onnx lowers a 4-D ``reduce_window_max`` to a 4-D ONNX MaxPool, which
  onnxruntime rejects ("Unsupported pooling size"); Pad/Slice/Max run everywhere.
  """
  if any(d != 1 for d in base_dilation):
    raise ExportError(f'ONNX export: reduce_window_max with base_dilation {base_dilation} '
                      'is not supported')
  xp = jax.lax.pad(x, jnp.array(-jnp.inf, x.dtype), [(lo, hi, 0) for lo, hi in padding])
  span = [(k - 1) * d + 1 for k, d in zip(window_dimensions, window_dilation)]
  out = [(n - s) // st + 1 for n, s, st in zip(xp.shape, span, window_strides)]
  result = None
  for offset in itertools.product(*[range(k) for k in window_dimensions]):
    start = [o * d for o, d in zip(offset, window_dilation)]
    view = jax.lax.slice(xp, start, [s + (n - 1) * st + 1 for s, n, st in
                                     zip(start, out, window_strides)], window_strides)
    result = view if result is None else jax.lax.max(result, view)
  return result


_ONNX_REWRITES = {'reduce_window_max': _max_pool_by_slices}
# Call-like primitives whose body is inlined: (primitive, param holding the body).
_INLINE = {'jit': 'jaxpr', 'pjit': 'jaxpr', 'custom_jvp_call': 'call_jaxpr',
           'custom_vjp_call': 'call_jaxpr', 'remat': 'jaxpr', 'checkpoint': 'jaxpr'}


def _eval_jaxpr(jaxpr, consts, *args):
  """Evaluates ``jaxpr`` with the ONNX-friendly rewrites and calls inlined."""
  env = {}

  def read(v):
    return v.val if isinstance(v, jex.core.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name in _INLINE and _INLINE[name] in eqn.params:
      body = eqn.params[_INLINE[name]]
      if isinstance(body, jex.core.ClosedJaxpr):
        outs = _eval_jaxpr(body.jaxpr, body.consts, *ins)
      else:
        outs = _eval_jaxpr(body, (), *ins)
    elif name == 'platform_index':
      outs = [None]  # read only by the platform cond below
    elif name == 'cond' and eqn.params.get('branches_platforms'):
      # lax.platform_dependent: ONNX runs anywhere, so take the default
      # branch (the first one when there is no default).
      chosen = next((i for i, p in enumerate(eqn.params['branches_platforms'])
                     if p is None), 0)
      body = eqn.params['branches'][chosen]
      outs = _eval_jaxpr(body.jaxpr, body.consts, *ins[1:])
    elif name in _ONNX_REWRITES:
      outs = [_ONNX_REWRITES[name](*ins, **eqn.params)]
    else:
      outs = eqn.primitive.bind(*ins, **eqn.params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def _failing_equation(exc: BaseException):
  """The jaxpr equation jax2onnx was lowering when ``exc`` was raised, or None."""
  tb, eqn = exc.__traceback__, None
  while tb is not None:
    candidate = tb.tb_frame.f_locals.get('eqn')
    if hasattr(candidate, 'primitive'):
      eqn = candidate
    tb = tb.tb_next
  return eqn


def export_onnx(fn: Callable, spec: InputSpec, path: str, *, what: str = 'the network',
                opset: int = 23) -> None:
  """Converts ``fn`` at ``spec`` (fixed spatial size) to an ONNX file at ``path``.

  ``fn`` is traced to a jaxpr first, so jax2onnx sees only JAX primitives
  (its Flax-level shims assume call signatures our layers do not use). A
  polymorphic batch becomes an ONNX ``Loop`` over the images (its
  per-image body has static shapes, which jax2onnx handles best).

  Raises:
    ExportError: naming the JAX operation that has no ONNX lowering.
  """
  _check_spec(spec)
  if spec.size is None:
    raise ExportError('ONNX export needs a fixed spatial size (--export_size=H,W)')
  jax2onnx, _, plugin_system = _import_onnx()
  per_call = dataclasses.replace(spec, batch=spec.batch or 1)
  closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct(tuple(per_call.json_shape()), spec.dtype))
  supported = (set(plugin_system.PLUGIN_REGISTRY) | set(_ONNX_REWRITES) | set(_INLINE)
               | {'platform_index'})
  for eqn in _walk(closed.jaxpr):
    if eqn.primitive.name not in supported:
      raise ExportError(f'cannot export {what} to ONNX: operation {eqn.primitive.name!r}'
                        f'{_where(eqn)} has no ONNX lowering in jax2onnx')

  def run(x):
    return _eval_jaxpr(closed.jaxpr, closed.consts, x)[0]

  if spec.batch is None:
    def converted(x):
      return jax.lax.map(lambda one: run(one[None])[0], x)
    shape = jax.export.symbolic_shape(f'B, {spec.size[0]}, {spec.size[1]}, 3')
  else:
    converted = run
    shape = tuple(per_call.json_shape())
  inputs = [jax.ShapeDtypeStruct(shape, spec.dtype)]
  try:
    with _restore_module_attrs():
      jax2onnx.to_onnx(converted, inputs, model_name='semseg_jax', opset=opset,
                       return_mode='file', output_path=path, input_names=[INPUT_NAME],
                       output_names=[spec.output])
  except ExportError:
    raise
  except Exception as e:  # pylint: disable=broad-except (converter errors vary)
    eqn = _failing_equation(e)
    op = f' at operation {eqn.primitive.name!r}{_where(eqn)}' if eqn is not None else ''
    raise ExportError(f'cannot export {what} to ONNX{op}: {_first_line(e)}') from e


def load_onnx(path: str) -> Callable[[np.ndarray], np.ndarray]:
  """A callable running the ONNX artifact with onnxruntime (CPU)."""
  if os.path.isdir(path):
    path = os.path.join(path, ARTIFACTS['onnx'])
  if not os.path.exists(path):
    raise FileNotFoundError(f'no ONNX artifact at {path}')
  _, ort, _ = _import_onnx()
  options = ort.SessionOptions()
  options.log_severity_level = 3  # jax2onnx leaves unused initialisers ORT warns about.
  session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
  name = session.get_inputs()[0].name

  def run(x):
    return session.run(None, {name: np.asarray(x)})[0]

  run.session = session
  return run


# -------------------------------------------------------------- SavedModel


def export_savedmodel(model, variables: dict[str, Any], spec: InputSpec, path: str, *,
                      mean: Sequence[float] = (0.0, 0.0, 0.0),
                      std: Sequence[float] = (1.0, 1.0, 1.0), bgr: bool = False,
                      platforms: Sequence[str] = DEFAULT_PLATFORMS) -> None:
  """A TF SavedModel with a ``serving_default`` signature (``[tf]`` extra).

  The weights are ``tf.Variable``s (no 2 GB GraphDef limit); the computation
  is the same StableHLO, wrapped by jax2tf in an ``XlaCallModule`` op.
  """
  _check_spec(spec)
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ExportError(f'SavedModel export needs the [tf] extra (pip install semseg-jax[tf]): '
                      f'{e}') from None

  def apply(v, x):
    return inference_fn(model, v, spec.output, mean=mean, std=std, bgr=bgr)(x)

  converted = jax2tf.convert(apply, polymorphic_shapes=[None, f'({spec.shape_str()})'],
                             with_gradient=False,
                             native_serialization_platforms=tuple(platforms))
  tf_vars = jax.tree.map(lambda a: tf.Variable(np.asarray(a), trainable=False), variables)
  module = tf.Module()
  module.variables_tree = tf.nest.flatten(tf_vars)
  tf_dtype = tf.uint8 if spec.output == 'labels' else tf.float32
  signature = tf.TensorSpec(spec.json_shape(), tf_dtype, name=INPUT_NAME)

  @tf.function(input_signature=[signature], autograph=False)
  def serve(image):
    return {spec.output: converted(tf_vars, image)}

  module.serve = serve
  tf.saved_model.save(module, path, signatures={'serving_default': serve})


# ------------------------------------------------------------------ driver


def export_model(model, variables: dict[str, Any], out_dir: str, *, fmt: str = 'stablehlo',
                 spec: InputSpec = InputSpec(None, None),
                 fallback_size: tuple[int, int] | None = None,
                 mean: Sequence[float] = (0.0, 0.0, 0.0),
                 std: Sequence[float] = (1.0, 1.0, 1.0), bgr: bool = False,
                 class_names: Sequence[str] | None = None,
                 model_name: str = 'model', extra: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
  """Writes ``out_dir/<artifact>`` and ``out_dir/<artifact>.json``; returns the JSON dict.

  Args:
    fmt: 'stablehlo', 'onnx' or 'savedmodel'.
    spec: batch (None = any), size (None = any multiple of 32, else falls
      back to ``fallback_size``) and output ('logits' or 'labels').
    mean, std, bgr: the training normalisation (0-255 units, network channel
      order; ``bgr``: the network takes BGR): recorded, and applied inside a
      'labels' artifact.
    class_names: recorded in the JSON (``len == K``).
  """
  if fmt not in FORMATS:
    raise ExportError(f'export format {fmt!r} must be one of {", ".join(FORMATS)}')
  _check_spec(spec)
  os.makedirs(out_dir, exist_ok=True)
  fn = inference_fn(model, variables, spec.output, mean=mean, std=std, bgr=bgr)
  what = model_name
  note = None
  if fmt == 'onnx' and spec.size is None:
    if fallback_size is None:
      raise ExportError('ONNX export needs a fixed spatial size (--export_size=H,W)')
    spec = dataclasses.replace(spec, size=tuple(int(s) for s in fallback_size))
    note = (f'ONNX needs a fixed spatial size: exported at {spec.size[0]}x{spec.size[1]} '
            '(--export_size=H,W picks another)')
    logging.warning(note)
  spec, trace_note = trace(fn, spec, fallback_size, what)
  note = note or trace_note
  path = os.path.join(out_dir, ARTIFACTS[fmt])
  if fmt == 'stablehlo':
    exported = export_stablehlo(fn, spec, path)
    platforms = list(exported.platforms)
  elif fmt == 'onnx':
    export_onnx(fn, spec, path, what=what)
    platforms = ['onnxruntime']
  else:
    export_savedmodel(model, variables, spec, path, mean=mean, std=std, bgr=bgr)
    platforms = list(DEFAULT_PLATFORMS)
  out_shape = jax.eval_shape(fn, jax.ShapeDtypeStruct(
      (spec.batch or 1, *(spec.size or (SPATIAL_MULTIPLE,) * 2), 3), spec.dtype))
  meta = {
      'format': fmt,
      'artifact': ARTIFACTS[fmt],
      'model': model_name,
      'output': spec.output,
      'input': {'name': INPUT_NAME, 'shape': spec.json_shape(), 'dtype': spec.dtype.name,
                'layout': 'NHWC', 'spatial_multiple': SPATIAL_MULTIPLE if spec.size is None
                else None,
                'normalised': spec.output == 'logits'},
      'outputs': {'name': spec.output, 'dtype': str(out_shape.dtype),
                  'shape': spec.json_shape()[:3] + ([out_shape.shape[-1]]
                                                    if spec.output == 'logits' else [])},
      'normalisation': {'mean': [float(m) for m in mean], 'std': [float(s) for s in std],
                        'units': '0-255', 'channel_order': 'BGR' if bgr else 'RGB',
                        'formula': '(image[..., channel_order] - mean) / std',
                        'applied_inside': spec.output == 'labels'},
      'class_names': list(class_names) if class_names is not None else None,
      # jax2onnx writes large weights to model.onnx.data beside the graph (keep both).
      'files': sorted(f for f in os.listdir(out_dir)
                      if f.startswith(ARTIFACTS[fmt]) and not f.endswith('.json')),
      'platforms': platforms,
      'note': note,
      **(extra or {}),
  }
  with open(path + '.json', 'w') as f:
    json.dump(meta, f, indent=2)
  return meta


def load(path: str) -> Callable[[Any], Any]:
  """The runner of an artifact (a file, or a directory from :func:`export_model`)."""
  if os.path.isdir(path):
    for fmt in ('stablehlo', 'onnx'):
      if os.path.exists(os.path.join(path, ARTIFACTS[fmt])):
        path = os.path.join(path, ARTIFACTS[fmt])
        break
  return load_onnx(path) if path.endswith('.onnx') else load_stablehlo(path)


def parse_batch(value: str) -> int | None:
  """``--export_batch``: 'polymorphic' -> None, 'N' -> N."""
  if value == 'polymorphic':
    return None
  try:
    batch = int(value)
  except ValueError:
    batch = 0
  if batch <= 0:
    raise ExportError(f"--export_batch={value!r} must be 'polymorphic' or a positive integer")
  return batch


def parse_size(value: str | None) -> tuple[int, int] | None | str:
  """``--export_size``: 'polymorphic' -> None, 'H,W' -> (H, W), unset -> 'config'."""
  if value is None:
    return 'config'
  if value == 'polymorphic':
    return None
  try:
    size = tuple(int(v) for v in value.replace('x', ',').split(','))
  except ValueError:
    size = ()
  if len(size) != 2 or min(size) <= 0:
    raise ExportError(f"--export_size={value!r} must be 'polymorphic' or H,W (e.g. 512,512)")
  return size


def export_workdir(config, workdir: str, *, fmt: str = 'stablehlo', out_dir: str | None = None,
                   batch: str = 'polymorphic', size: str | None = None,
                   output: str = 'logits', verify: bool = True) -> dict[str, Any]:
  """``--mode=export``: the workdir's ``config.eval_checkpoint`` as an artifact.

  ``size`` unset exports at ``config.dataset.image_size``. With ``verify``
  the artifact is reloaded by its own runtime and compared with the jitted
  model on one random input; the difference is recorded as ``max_abs_diff``.
  """
  from semseg_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from semseg_jax import train  # pylint: disable=g-import-not-at-top (train is heavy)
  if fmt not in FORMATS:
    raise ExportError(f'--export_format={fmt!r} must be one of {", ".join(FORMATS)}')
  if output not in OUTPUTS:
    raise ExportError(f'--export_output={output!r} must be one of {", ".join(OUTPUTS)}')
  batch_n = parse_batch(batch)
  size_v = parse_size(size)
  image_size = tuple(int(s) for s in config.dataset.image_size)
  spec_size = image_size if size_v == 'config' else size_v
  out_dir = out_dir or os.path.join(workdir, 'export', fmt)
  mean, std, bgr = _normalization(config)
  model, variables, step = train.restore_variables(config, workdir, config.eval_checkpoint)
  try:
    class_names = list(data_lib.get_dataset_info(
        config.dataset.name, data_dir=config.dataset.data_dir).class_names)
  except data_lib.DatasetNotFoundError:
    class_names = None  # Export must not need the dataset itself.
  if class_names is not None and len(class_names) != config.num_classes:
    class_names = None
  meta = export_model(
      model, variables, out_dir, fmt=fmt, spec=InputSpec(batch_n, spec_size, output),
      fallback_size=image_size, mean=mean, std=std, bgr=bgr,
      class_names=class_names, model_name=config.model.name,
      extra={'checkpoint': {'workdir': os.path.abspath(workdir), 'step': int(step),
                            'which': config.eval_checkpoint}})
  if verify and fmt != 'savedmodel':
    meta['max_abs_diff'] = _verify(model, variables, out_dir, meta)
    with open(os.path.join(out_dir, meta['artifact'] + '.json'), 'w') as f:
      json.dump(meta, f, indent=2)
  return meta


def _normalization(config) -> tuple[tuple[float, ...], tuple[float, ...], bool]:
  """``(mean, std, bgr)`` the training pipeline normalised with."""
  from semseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top (imports grain)
  if 'normalization' in config.dataset and hasattr(pipeline, 'normalization'):
    try:
      norm = pipeline.normalization(config.dataset)
    except ValueError as e:
      raise ExportError(str(e)) from None
    return tuple(norm.mean), tuple(norm.std), bool(getattr(norm, 'bgr', False))
  return tuple(config.dataset.mean), tuple(config.dataset.std), False


def _verify(model, variables, out_dir: str, meta: dict[str, Any]) -> float:
  """Max |artifact - jitted model| on one random input of the exported shape."""
  shape = [d if d is not None else (2 if i == 0 else SPATIAL_MULTIPLE * 2)
           for i, d in enumerate(meta['input']['shape'])]
  rng = np.random.default_rng(0)
  if meta['output'] == 'labels':
    x = rng.integers(0, 256, shape, dtype=np.uint8)
  else:
    x = rng.standard_normal(shape).astype(np.float32)
  norm = meta['normalisation']
  fn = inference_fn(model, variables, meta['output'], mean=norm['mean'], std=norm['std'],
                    bgr=norm['channel_order'] == 'BGR')
  want = np.asarray(jax.jit(fn)(x))
  got = np.asarray(load(os.path.join(out_dir, meta['artifact']))(x))
  if meta['output'] == 'labels':
    return float(np.mean(want != got))  # Fraction of differing labels (argmax ties).
  return float(np.max(np.abs(want.astype(np.float64) - got)))


