"""Feature extractors shared by the segmentation heads (VGG16, ...)."""
from semseg_jax.models.backbones.vgg import VGG16, scaled_width

__all__ = ['VGG16', 'scaled_width']
