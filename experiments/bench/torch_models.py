"""PyTorch (eager) twins of four semseg-jax networks, for speed comparisons.

Written for this benchmark from the papers and from our Flax modules
(semseg_jax/models/{fcn,segnet,unet,pspnet}.py): same layers, widths,
paddings and output sizes, NCHW as PyTorch prefers. They exist only to time
an equivalent eager implementation; they are not weight-compatible with
anything. Importing this module requires torch.

    build('fcn8s', num_classes=21, width_mult=1.0) -> torch.nn.Module
    forward(x [B, 3, H, W]) -> (logits [B, K, H, W], aux tuple)
"""
from __future__ import annotations

import os

if __name__ == '__main__' and os.environ.get('SEMSEG_BENCH_MALLOC'):
  # bench.py --malloc=tuned: semseg_jax.cpu_malloc's glibc settings, applied
  # before torch starts, as bench.py applies them before JAX starts.
  import importlib.util
  _spec = importlib.util.spec_from_file_location(
      'cpu_malloc', os.environ['SEMSEG_BENCH_MALLOC'])
  _malloc = importlib.util.module_from_spec(_spec)
  _spec.loader.exec_module(_malloc)
  _MALLOC_TUNED = _malloc.tune_cpu_malloc()
else:
  _MALLOC_TUNED = False

import torch  # pylint: disable=wrong-import-position
from torch import nn
import torch.nn.functional as F


def _w(c: int, mult: float) -> int:
  """Channel count scaled like semseg_jax's ``scaled_width``."""
  return max(1, int(round(c * mult)))


def _cbr(cin, cout, k=3, stride=1, pad=1, dil=1, bias=True, bn=True,
         relu=True):
  mods = [nn.Conv2d(cin, cout, k, stride, pad, dil, bias=bias)]
  if bn:
    mods.append(nn.BatchNorm2d(cout))
  if relu:
    mods.append(nn.ReLU(inplace=True))
  return nn.Sequential(*mods)


class FCN8s(nn.Module):
  """VGG16 (conv1_1 padded by 100, ceil pooling) + fc6/fc7 + learned
  bilinear-initialised upsampling with the FCN crops (5, 9, 31)."""

  def __init__(self, num_classes, width_mult=1.0):
    super().__init__()
    blocks, cin = [], 3
    for n, c in ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512)):
      c = _w(c, width_mult)
      layers = []
      for i in range(n):
        pad = 100 if cin == 3 and i == 0 else 1
        layers += [nn.Conv2d(cin, c, 3, padding=pad), nn.ReLU(inplace=True)]
        cin = c
      layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
      blocks.append(nn.Sequential(*layers))
    self.blocks = nn.ModuleList(blocks)
    fc = _w(4096, width_mult)
    k = num_classes
    self.classifier = nn.Sequential(
        nn.Conv2d(cin, fc, 7), nn.ReLU(inplace=True), nn.Dropout2d(0.5),
        nn.Conv2d(fc, fc, 1), nn.ReLU(inplace=True), nn.Dropout2d(0.5),
        nn.Conv2d(fc, k, 1))
    self.score_pool4 = nn.Conv2d(_w(512, width_mult), k, 1)
    self.score_pool3 = nn.Conv2d(_w(256, width_mult), k, 1)
    self.upscore2 = nn.ConvTranspose2d(k, k, 4, 2, bias=False)
    self.upscore4 = nn.ConvTranspose2d(k, k, 4, 2, bias=False)
    self.upscore8 = nn.ConvTranspose2d(k, k, 16, 8, bias=False)

  def forward(self, x):
    h, w = x.shape[2:]
    feats = []
    for block in self.blocks:
      x = block(x)
      feats.append(x)
    score = self.upscore2(self.classifier(x))
    p4 = self.score_pool4(feats[3])[:, :, 5:5 + score.shape[2],
                                    5:5 + score.shape[3]]
    score = self.upscore4(score + p4)
    p3 = self.score_pool3(feats[2])[:, :, 9:9 + score.shape[2],
                                    9:9 + score.shape[3]]
    score = self.upscore8(score + p3)
    return score[:, :, 31:31 + h, 31:31 + w], ()


class SegNet(nn.Module):
  """VGG16 encoder of conv-BN-ReLU stacks with argmax pooling; the decoder
  unpools with the saved indices. Last layer a plain conv."""

  ENC = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512),
         (512, 512, 512))
  DEC = ((512, 512, 512), (512, 512, 256), (256, 256, 128), (128, 64),
         (64, None))

  def __init__(self, num_classes, width_mult=1.0):
    super().__init__()

    def stack(cin, widths, last_plain=False):
      mods = []
      for i, c in enumerate(widths):
        plain = last_plain and i == len(widths) - 1
        c = num_classes if c is None else _w(c, width_mult)
        mods.append(_cbr(cin, c, bn=not plain, relu=not plain))
        cin = c
      return nn.Sequential(*mods), cin

    self.enc, self.dec, cin = nn.ModuleList(), nn.ModuleList(), 3
    for widths in self.ENC:
      s, cin = stack(cin, widths)
      self.enc.append(s)
    for i, widths in enumerate(self.DEC):
      s, cin = stack(cin, widths, last_plain=i == len(self.DEC) - 1)
      self.dec.append(s)

  def forward(self, x):
    pools = []
    for s in self.enc:
      x = s(x)
      size = x.shape[2:]
      x, idx = F.max_pool2d(x, 2, 2, ceil_mode=True, return_indices=True)
      pools.append((idx, size))
    for s, (idx, size) in zip(self.dec, reversed(pools)):
      x = s(F.max_unpool2d(x, idx, 2, 2, output_size=size))
    return x, ()


class UNet(nn.Module):
  """U-Net with padding 1 ('same'), BN in the encoder, transposed-conv
  upsampling, ``[skip, up]`` concatenation and conv-ReLU decoder."""

  def __init__(self, num_classes, feature_scale=4):
    super().__init__()
    f = [int(c / feature_scale) for c in (64, 128, 256, 512, 1024)]
    self.down, cin = nn.ModuleList(), 3
    for c in f:
      self.down.append(nn.Sequential(_cbr(cin, c), _cbr(c, c)))
      cin = c
    self.ups, self.up_convs = nn.ModuleList(), nn.ModuleList()
    for i in reversed(range(4)):
      self.ups.append(nn.ConvTranspose2d(f[i + 1], f[i], 2, 2))
      self.up_convs.append(nn.Sequential(_cbr(2 * f[i], f[i], bn=False),
                                         _cbr(f[i], f[i], bn=False)))
    self.final = nn.Conv2d(f[0], num_classes, 1)

  def forward(self, x):
    skips = []
    for i, d in enumerate(self.down):
      x = d(x)
      if i < 4:
        skips.append(x)
        x = F.max_pool2d(x, 2, 2)
    for up, conv, skip in zip(self.ups, self.up_convs, reversed(skips)):
      u = up(x)
      u = F.pad(u, (0, skip.shape[3] - u.shape[3], 0,
                    skip.shape[2] - u.shape[2]))
      x = conv(torch.cat([skip, u], 1))
    return self.final(x), ()


class _Bottleneck(nn.Module):

  def __init__(self, cin, mid, cout, stride=1, dil=1):
    super().__init__()
    self.body = nn.Sequential(
        _cbr(cin, mid, 1, pad=0, bias=False),
        _cbr(mid, mid, 3, stride, dil, dil, bias=False),
        _cbr(mid, cout, 1, pad=0, bias=False, relu=False))
    self.proj = (None if cin == cout and stride == 1 else
                 _cbr(cin, cout, 1, stride, 0, bias=False, relu=False))

  def forward(self, x):
    s = x if self.proj is None else self.proj(x)
    return F.relu(self.body(x) + s)


class PSPNet(nn.Module):
  """Deep-stem dilated ResNet (output stride 8), pyramid pooling (6, 3, 2,
  1), cbr_final, classifier and the auxiliary head on res4 (training)."""

  def __init__(self, num_classes, block_config=(3, 4, 6, 3), width_mult=1.0,
               bins=(6, 3, 2, 1)):
    super().__init__()
    w = lambda c: _w(c, width_mult)  # noqa: E731
    self.stem = nn.Sequential(
        _cbr(3, w(64), 3, 2, bias=False), _cbr(w(64), w(64), bias=False),
        _cbr(w(64), w(128), bias=False), nn.MaxPool2d(3, 2, 1))
    stages, cin = [], w(128)
    for n, mid, out, stride, dil in zip(
        block_config, (64, 128, 256, 512), (256, 512, 1024, 2048),
        (1, 2, 1, 1), (1, 1, 2, 4)):
      blocks = [_Bottleneck(cin, w(mid), w(out), stride, dil)]
      blocks += [_Bottleneck(w(out), w(mid), w(out), 1, dil)
                 for _ in range(n - 1)]
      stages.append(nn.Sequential(*blocks))
      cin = w(out)
    self.stages = nn.ModuleList(stages)
    self.bins = bins
    branch = int(cin / len(bins))
    self.paths = nn.ModuleList(
        [_cbr(cin, branch, 1, pad=0, bias=False) for _ in bins])
    self.cbr_final = _cbr(cin + len(bins) * branch, w(512), bias=False)
    self.drop = nn.Dropout2d(0.1)
    self.cls = nn.Conv2d(w(512), num_classes, 1)
    self.aux = _cbr(w(1024), w(256), bias=False)
    self.aux_cls = nn.Conv2d(w(256), num_classes, 1)

  def forward(self, x):
    size = x.shape[2:]
    h = self.stem(x)
    for i, stage in enumerate(self.stages):
      h = stage(h)
      if i == 2:
        res4 = h
    hw = h.shape[2:]
    outs = [h] + [
        F.interpolate(p(F.adaptive_avg_pool2d(h, b)), hw, mode='bilinear',
                      align_corners=True) for p, b in zip(self.paths, self.bins)
    ]
    h = self.cls(self.drop(self.cbr_final(torch.cat(outs, 1))))
    logits = F.interpolate(h, size, mode='bilinear', align_corners=True)
    aux = ((self.aux_cls(self.drop(self.aux(res4))),) if self.training
           else ())
    return logits, aux


def build(name: str, num_classes: int, **options) -> nn.Module:
  """The twin of ``semseg_jax.get_model(name, num_classes, **options)`` for
  fcn8s / segnet / unet / pspnet (options: width_mult, feature_scale,
  block_config)."""
  if name == 'fcn8s':
    return FCN8s(num_classes, options.get('width_mult', 1.0))
  if name == 'segnet':
    return SegNet(num_classes, options.get('width_mult', 1.0))
  if name == 'unet':
    return UNet(num_classes, options.get('feature_scale', 4))
  if name == 'pspnet':
    return PSPNet(num_classes, tuple(options.get('block_config', (3, 4, 6, 3))),
                  options.get('width_mult', 1.0))
  raise ValueError(f'no PyTorch twin for {name!r}; have fcn8s, segnet, unet, '
                   'pspnet')


MODELS = ('fcn8s', 'segnet', 'unet', 'pspnet')


# ----------------------------------------------------------------------------
# Timing worker: `python torch_models.py` reads JSON requests on stdin, one a
# line, and answers one JSON line each, so that bench.py (another venv or
# interpreter) can alternate PyTorch and JAX steps.


def _worker():  # pragma: no cover - driven by bench.py
  import json
  import sys
  import time

  state = {}
  for line in sys.stdin:
    req = json.loads(line)
    if req['op'] == 'setup':
      torch.manual_seed(0)
      dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
      model = build(req['model'], req['num_classes'], **req['options']).to(
          dev).to(memory_format=torch.channels_last)
      b, h, w = req['batch'], req['size'][0], req['size'][1]
      x = torch.randn(b, 3, h, w, device=dev).to(
          memory_format=torch.channels_last)
      y = torch.randint(0, req['num_classes'], (b, h, w), device=dev)
      opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
      amp = req.get('dtype') == 'bfloat16'
      state = dict(model=model, x=x, y=y, opt=opt, dev=dev, amp=amp)
      print(json.dumps({'ok': True, 'device': str(dev),
                        'torch': torch.__version__,
                        'threads': torch.get_num_threads(),
                        'malloc': 'tuned' if _MALLOC_TUNED else 'default'}),
            flush=True)
      continue
    s = state
    model, x, y, dev = s['model'], s['x'], s['y'], s['dev']

    def sync():
      if dev.type == 'cuda':
        torch.cuda.synchronize()

    def train_step():
      model.train()
      with torch.autocast(dev.type, torch.bfloat16, enabled=s['amp']):
        logits, aux = model(x)
        loss = F.cross_entropy(logits.float(), y)
        for a in aux:
          loss = loss + 0.4 * F.cross_entropy(
              F.interpolate(a.float(), y.shape[1:], mode='bilinear',
                            align_corners=True), y)
      s['opt'].zero_grad(set_to_none=True)
      loss.backward()
      s['opt'].step()

    def infer_step():
      model.eval()
      with torch.inference_mode(), torch.autocast(
          dev.type, torch.bfloat16, enabled=s['amp']):
        model(x)[0].argmax(1)

    fn = train_step if req['op'] == 'train' else infer_step
    times = []
    try:
      for _ in range(req['n']):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    except Exception as e:  # pylint: disable=broad-except
      print(json.dumps({'error': f'{type(e).__name__}: {e}'}), flush=True)
      continue
    print(json.dumps({'times': times}), flush=True)


if __name__ == '__main__':
  _worker()
