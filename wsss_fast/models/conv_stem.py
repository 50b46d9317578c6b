"""A convolutional patch embedding for timm's VisionTransformer, and small ViTs built on it.

A plain ViT's patch embedding (one strided linear projection) learns nothing useful on the
64 px synthetic shapes in minutes on a CPU (methods.md); a stack of 3x3 conv-norm-ReLU
layers gives the transformer local features from the start and needs far less data
(the "early convolutions" of Xiao et al., 2021). ``ConvStemPatchEmbed`` is a drop-in
``embed_layer``: it subclasses timm's ``PatchEmbed`` and only replaces ``proj``, so
``patch_size``, ``grid_size``, ``feat_ratio()``, ``dynamic_feat_size()`` and the NLC or
NHWC output formats behave as timm's own.

``vit_convstem_tiny_patch8`` is registered with timm once ``wsss_fast.models`` is
imported; its ``.synthshapes`` tag holds a backbone pretrained in this package on
synthetic shapes of classes other than the built-in dataset's (``pretrain_synthetic``),
the stand-in for the ImageNet weights every real run starts from:

    timm.create_model("vit_convstem_tiny_patch8.synthshapes", pretrained=True, num_classes=0)
"""

import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from timm.layers import PatchEmbed, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SYNTHSHAPES_WEIGHTS = WEIGHTS_DIR / "vit_convstem_tiny_patch8.synthshapes.pt"

# One entry per stride-2 stage: the product of the strides is the patch size.
DEFAULT_STEM_CHANNELS = (32, 64, 128)
DEFAULT_CONVS_PER_STAGE = 1  # stride-1 3x3 convs after each stride-2 conv: receptive field


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        # Groups of 8 channels: independent of the batch size (tiny or mixed-crop batches).
        return nn.GroupNorm(max(1, channels // 8), channels)
    raise ValueError(f"stem_norm must be 'batch' or 'group', got {kind!r}")


def _conv_norm_relu(in_channels: int, out_channels: int, stride: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
        _norm(norm, out_channels),
        nn.ReLU(inplace=True),
    )


class ConvStemPatchEmbed(PatchEmbed):
    """Patch embedding by 3x3 conv-norm-ReLU stages, each halving the resolution.

    (B, 3, H, W) -> (B, H/p * W/p, D) tokens (or (B, H/p, W/p, D) with ``output_fmt="NHWC"``,
    as timm asks for under ``dynamic_img_size=True``), p = ``patch_size`` = 2 **
    len(stem_channels). Any H and W divisible by p are accepted (multi-scale inference):
    ``strict_img_size`` defaults to False, and ``img_size`` only sets ``grid_size``, the
    position-embedding grid the ViT is built with.

    Args:
        stem_channels: output channels of each stride-2 stage.
        convs_per_stage: stride-1 conv-norm-ReLU layers after each stride-2 one.
        stem_norm: "batch" (BatchNorm2d) or "group" (GroupNorm, 8 channels a group).
        Other arguments as timm's ``PatchEmbed``; ``bias`` applies to the final 1x1
        projection to ``embed_dim``.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] | None = 64,
        patch_size: int = 8,
        in_chans: int = 3,
        embed_dim: int = 192,
        norm_layer=None,
        flatten: bool = True,
        output_fmt: str | None = None,
        bias: bool = True,
        strict_img_size: bool = False,
        dynamic_img_pad: bool = False,
        stem_channels: Sequence[int] = DEFAULT_STEM_CHANNELS,
        convs_per_stage: int = DEFAULT_CONVS_PER_STAGE,
        stem_norm: str = "batch",
        device=None,
        dtype=None,
    ):
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=norm_layer,
            flatten=flatten,
            output_fmt=output_fmt,
            bias=bias,
            strict_img_size=strict_img_size,
            dynamic_img_pad=dynamic_img_pad,
            device=device,
            dtype=dtype,
        )
        if self.patch_size[0] != self.patch_size[1] or self.patch_size[0] != 2 ** len(
            stem_channels
        ):
            raise ValueError(
                f"patch_size {patch_size} must be square and equal 2 ** len(stem_channels) "
                f"= {2 ** len(stem_channels)} (one stride-2 stage per stem_channels entry)"
            )
        layers: list[nn.Module] = []
        channels = in_chans
        for out_channels in stem_channels:
            layers.append(_conv_norm_relu(channels, out_channels, 2, stem_norm))
            layers.extend(
                _conv_norm_relu(out_channels, out_channels, 1, stem_norm)
                for _ in range(convs_per_stage)
            )
            channels = out_channels
        layers.append(nn.Conv2d(channels, embed_dim, 1, bias=bias))
        self.proj = nn.Sequential(*layers).to(device=device, dtype=dtype)
        self._init_stem()

    def _init_stem(self) -> None:
        """He init for the ReLU convs; the 1x1 projection like timm's patch embedding."""
        *convs, projection = (m for m in self.proj.modules() if isinstance(m, nn.Conv2d))
        for conv in convs:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        fan_in = projection.weight[0].numel()
        nn.init.trunc_normal_(projection.weight, std=1 / math.sqrt(fan_in))
        if projection.bias is not None:
            nn.init.zeros_(projection.bias)

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """Changes ``img_size`` (the grid); a new patch size would need a new stem."""
        if patch_size is not None and to_2tuple(patch_size) != self.patch_size:
            raise ValueError("ConvStemPatchEmbed cannot change its patch size")
        super().set_input_size(img_size=img_size)


def _cfg(**kwargs) -> dict:
    return {
        "num_classes": 0,  # headless: the shipped backbones carry no classifier
        "input_size": (3, 64, 64),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": "patch_embed.proj.0.0",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        # The default tag. Pretrained by ``python -m wsss_fast.models.pretrain_synthetic`` on the
        # "pretrain" class set of the synthetic shapes (none of the 8 target classes).
        "vit_convstem_tiny_patch8.synthshapes": _cfg(file=str(SYNTHSHAPES_WEIGHTS)),
    }
)


def _create_convstem_vit(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    stem_args = {
        key: kwargs.pop(key)
        for key in ("stem_channels", "convs_per_stage", "stem_norm")
        if key in kwargs
    }
    kwargs.setdefault("embed_layer", partial(ConvStemPatchEmbed, **stem_args))
    return build_model_with_cfg(VisionTransformer, variant, pretrained, **kwargs)


@register_model
def vit_convstem_tiny_patch8(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Tiny-like (width 192, 3 heads, depth 4) on a 3-stage conv stem, patch 8, 64 px.

    A class token without a position (``no_embed_class``: the position embedding covers
    the patches only), which ToCo's class-token contrast and WeakTr's class tokens need;
    average pooling over the patches for a classifier.
    Stem options (``stem_channels``, ``convs_per_stage``, ``stem_norm``) and any
    VisionTransformer argument can be overridden through ``timm.create_model``.
    """
    model_args = {
        "img_size": 64,
        "patch_size": 8,
        "embed_dim": 192,
        "depth": 4,
        "num_heads": 3,
        "mlp_ratio": 4.0,
        "class_token": True,
        "no_embed_class": True,
        "global_pool": "avg",
    }
    return _create_convstem_vit(
        "vit_convstem_tiny_patch8", pretrained=pretrained, **{**model_args, **kwargs}
    )


__all__ = [
    "SYNTHSHAPES_WEIGHTS",
    "ConvStemPatchEmbed",
    "vit_convstem_tiny_patch8",
]
