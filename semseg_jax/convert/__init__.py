"""Weight import/export: pytorch-semseg and torchvision checkpoints <-> Flax."""
from semseg_jax.convert.ptsemseg import ARCHS
from semseg_jax.convert.ptsemseg import ArchSpec
from semseg_jax.convert.ptsemseg import build
from semseg_jax.convert.ptsemseg import from_ptsemseg
from semseg_jax.convert.ptsemseg import KINDS
from semseg_jax.convert.ptsemseg import list_archs
from semseg_jax.convert.ptsemseg import register_arch
from semseg_jax.convert.ptsemseg import Rule
from semseg_jax.convert.ptsemseg import Tensor
from semseg_jax.convert.ptsemseg import to_ptsemseg
from semseg_jax.convert.ptsemseg import vgg16

__all__ = ['ARCHS', 'ArchSpec', 'KINDS', 'Rule', 'Tensor', 'build',
           'from_ptsemseg', 'list_archs', 'register_arch', 'to_ptsemseg', 'vgg16']
