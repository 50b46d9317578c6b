"""Backbones: timm ViTs on a convolutional stem (registered with timm on import)."""

from wsss_fast.models.conv_stem import SYNTHSHAPES_WEIGHTS, ConvStemPatchEmbed

__all__ = ["SYNTHSHAPES_WEIGHTS", "ConvStemPatchEmbed"]
