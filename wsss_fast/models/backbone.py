"""A thin wrapper over any timm Vision Transformer for WSSS.

What the methods need from a ViT and timm already does, used through timm's own API:
``forward_intermediates`` gives the tokens of any block; ``dynamic_img_size`` resizes
the position embedding (bicubic) to each input's token grid, so multi-scale CAMs and
local crops need no special path; attention stays timm's fused SDPA path. What this
adds: one output type, the class token split off, optional capture of every block's
query and key (for ``fuse_attention_maps``), and local pretrained weights loaded
through timm (``pretrained_cfg_overlay=dict(file=...)``).
"""

import os
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".npz")


@dataclass
class BackboneOutput:
    """Tokens of one forward pass.

    - ``patch_tokens``: (B, N, D) final patch tokens after the final norm;
    - ``class_token``: (B, D) the first prefix token after the final norm;
    - ``grid``: (h, w) token grid, h * w = N;
    - ``intermediate``: block index -> (B, N, D) patch tokens of that block, before
      the final norm;
    - ``queries``, ``keys``: per block (B, H, T, d) with T = prefix + patch tokens,
      when capture was requested, else empty.
    """

    patch_tokens: torch.Tensor
    class_token: torch.Tensor
    grid: tuple[int, int]
    intermediate: dict[int, torch.Tensor]
    queries: list[torch.Tensor]
    keys: list[torch.Tensor]

    def patch_map(self, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, D) tokens (the final ones by default) as a (B, D, h, w) map."""
        tokens = self.patch_tokens if tokens is None else tokens
        batch, _, width = tokens.shape
        return tokens.transpose(1, 2).reshape(batch, width, *self.grid)


def create_vit(
    name: str, pretrained: str | None = None, img_size: int | None = None, **kwargs
) -> nn.Module:
    """A timm ViT without its classifier, with dynamic input sizes.

    ``pretrained``: None (random initialisation); a local weights file (timm loads and
    adapts it, e.g. resamples the position embedding to ``img_size``); or a timm name
    with a weights tag of the same architecture as ``name``
    (``vit_base_patch16_224.augreg_in21k_ft_in1k``), fetched by timm where the network
    allows.
    """
    options = dict(num_classes=0, dynamic_img_size=True, **kwargs)
    if img_size is not None:
        options["img_size"] = img_size
    if pretrained is None:
        model = timm.create_model(name, pretrained=False, **options)
    elif Path(pretrained).expanduser().is_file():
        overlay = dict(file=str(Path(pretrained).expanduser()))
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **options)
    elif os.sep in pretrained or pretrained.endswith(WEIGHT_FILE_SUFFIXES):
        raise FileNotFoundError(
            f"pretrained weights file {pretrained} does not exist (give a file, timm "
            "weights of the backbone as '<architecture>.<tag>', or nothing)"
        )
    else:
        architecture = name.split(".")[0]
        if pretrained.split(".")[0] != architecture:
            raise ValueError(
                f"pretrained {pretrained!r} is neither a file nor timm weights of the "
                f"backbone's architecture {architecture!r} (e.g. '{architecture}.<tag>')"
            )
        model = timm.create_model(pretrained, pretrained=True, **options)
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "blocks"):
        raise ValueError(f"timm model {name!r} is not a Vision Transformer with blocks")
    if getattr(model, "cls_token", None) is None:
        raise ValueError(f"timm model {name!r} has no class token, which the methods need")
    return model


class ViTBackbone(nn.Module):
    """A timm ViT returning ``BackboneOutput``.

    Args:
        name: timm model name (any ViT with a class token).
        pretrained: see ``create_vit``.
        img_size: the training crop size (position embedding size at creation).
        drop_path_rate: stochastic depth.
    """

    def __init__(
        self,
        name: str,
        pretrained: str | None = None,
        img_size: int | None = None,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.vit = create_vit(name, pretrained, img_size, drop_path_rate=drop_path_rate)
        patch_size = self.vit.patch_embed.patch_size
        self.patch_size = int(patch_size[0] if isinstance(patch_size, tuple) else patch_size)
        self.embed_dim = int(self.vit.embed_dim)
        self.num_blocks = len(self.vit.blocks)
        self.num_prefix_tokens = int(self.vit.num_prefix_tokens)

    def block_index(self, index: int) -> int:
        """A Python-style block index (-3: third from last) as a non-negative one."""
        if not -self.num_blocks <= index < self.num_blocks:
            raise ValueError(f"block index {index} is out of range for {self.num_blocks} blocks")
        return index % self.num_blocks

    def set_fused_attention(self, enabled: bool) -> None:
        """Switches every block between SDPA and explicit attention (the reference path)."""
        for block in self.vit.blocks:
            block.attn.fused_attn = enabled

    def forward(
        self,
        images: torch.Tensor,
        intermediate_blocks: tuple[int, ...] = (),
        capture_query_key: bool = False,
    ) -> BackboneOutput:
        """Images (B, 3, H, W), H and W multiples of the patch size -> ``BackboneOutput``."""
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} must be a multiple of the patch size "
                f"{self.patch_size}"
            )
        indices = sorted({self.block_index(index) for index in intermediate_blocks})
        queries: list[torch.Tensor] = []
        keys: list[torch.Tensor] = []
        handles = []
        if capture_query_key:
            for block in self.vit.blocks:
                handles.append(
                    block.attn.qkv.register_forward_hook(_query_key_hook(block.attn, queries, keys))
                )
        try:
            final, intermediates = self.vit.forward_intermediates(
                images, indices=indices or [self.num_blocks - 1], norm=False, output_fmt="NLC"
            )
        finally:
            for handle in handles:
                handle.remove()
        prefix = self.num_prefix_tokens
        return BackboneOutput(
            patch_tokens=final[:, prefix:],
            class_token=final[:, 0],
            grid=(height // self.patch_size, width // self.patch_size),
            intermediate=dict(zip(indices, intermediates, strict=True)) if indices else {},
            queries=queries,
            keys=keys,
        )


def _query_key_hook(attention: nn.Module, queries: list, keys: list):
    """A forward hook on ``attention.qkv`` that keeps q and k as the block uses them."""

    def hook(_module, _inputs, qkv: torch.Tensor) -> None:
        batch, tokens, _ = qkv.shape
        qkv = qkv.reshape(batch, tokens, 3, attention.num_heads, attention.head_dim)
        query, key, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        queries.append(attention.q_norm(query))
        keys.append(attention.k_norm(key))

    return hook


@dataclass
class ClassTokensOutput:
    """Tokens of one forward pass of ``ClassTokensBackbone``.

    - ``class_tokens``: (B, C, D) the C class tokens after the final norm;
    - ``patch_tokens``: (B, N, D) patch tokens after the final norm;
    - ``grid``: (h, w) token grid, h * w = N;
    - ``queries``, ``keys``: per block (B, H, C + N, d), as the block's attention uses them;
    - ``attention_outputs``: per block (B, C + N, D), the attention branch's output
      after its projection (before layer scale and drop-path).
    """

    class_tokens: torch.Tensor
    patch_tokens: torch.Tensor
    grid: tuple[int, int]
    queries: list[torch.Tensor]
    keys: list[torch.Tensor]
    attention_outputs: list[torch.Tensor]

    def patch_map(self) -> torch.Tensor:
        """The patch tokens as a (B, D, h, w) map."""
        batch, _, width = self.patch_tokens.shape
        return self.patch_tokens.transpose(1, 2).reshape(batch, width, *self.grid)


class ClassTokensBackbone(ViTBackbone):
    """A timm ViT with one class token per class (MCTformer's layout): C class tokens,
    then the patches.

    Every class token starts as a copy of the pretrained class token, and, where the ViT
    gives its class token a position (``no_embed_class`` False), that position is copied
    to each. The timm model's own class token is replaced (frozen, unused). The blocks
    keep their fused attention; every forward captures each block's query, key and
    attention-branch output for the adaptive attention fusion.

    Args:
        name, pretrained, img_size, drop_path_rate: as ``ViTBackbone``.
        num_class_tokens: C.
    """

    def __init__(
        self,
        name: str,
        num_class_tokens: int,
        pretrained: str | None = None,
        img_size: int | None = None,
        drop_path_rate: float = 0.0,
    ):
        super().__init__(name, pretrained, img_size, drop_path_rate)
        vit = self.vit
        if self.num_prefix_tokens != 1:
            raise ValueError(
                f"timm model {name!r} has {self.num_prefix_tokens} prefix tokens; class tokens "
                "need a ViT with exactly one (no register tokens)"
            )
        if num_class_tokens < 1:
            raise ValueError(f"num_class_tokens must be >= 1, got {num_class_tokens}")
        self.num_class_tokens = num_class_tokens
        shape = (1, num_class_tokens, self.embed_dim)
        self.class_tokens = nn.Parameter(vit.cls_token.detach().expand(shape).clone())
        self.class_position = None
        if vit.pos_embed is not None and not vit.no_embed_class:
            self.class_position = nn.Parameter(vit.pos_embed[:, :1].detach().expand(shape).clone())
        vit.cls_token.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> ClassTokensOutput:
        """Images (B, 3, H, W), H and W multiples of the patch size -> ``ClassTokensOutput``."""
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} must be a multiple of the patch size "
                f"{self.patch_size}"
            )
        vit = self.vit
        tokens = vit.patch_embed(images)
        batch = tokens.shape[0]
        grid = (height // self.patch_size, width // self.patch_size)
        tokens = tokens.reshape(batch, grid[0] * grid[1], self.embed_dim)
        if vit.pos_embed is not None:
            first_patch = 0 if vit.no_embed_class else self.num_prefix_tokens
            tokens = tokens + resample_abs_pos_embed(
                vit.pos_embed[:, first_patch:],
                new_size=grid,
                old_size=vit.patch_embed.grid_size,
                num_prefix_tokens=0,
            )
        class_tokens = self.class_tokens.expand(batch, -1, -1)
        if self.class_position is not None:
            class_tokens = class_tokens + self.class_position
        tokens = vit.norm_pre(vit.patch_drop(vit.pos_drop(torch.cat([class_tokens, tokens], 1))))

        queries: list[torch.Tensor] = []
        keys: list[torch.Tensor] = []
        attention_outputs: list[torch.Tensor] = []
        handles = []
        for block in vit.blocks:
            handles.append(
                block.attn.qkv.register_forward_hook(_query_key_hook(block.attn, queries, keys))
            )
            handles.append(
                block.attn.register_forward_hook(
                    lambda _module, _inputs, output: attention_outputs.append(output)
                )
            )
        try:
            for block in vit.blocks:
                tokens = block(tokens)
        finally:
            for handle in handles:
                handle.remove()
        tokens = vit.norm(tokens)
        count = self.num_class_tokens
        return ClassTokensOutput(
            class_tokens=tokens[:, :count],
            patch_tokens=tokens[:, count:],
            grid=grid,
            queries=queries,
            keys=keys,
            attention_outputs=attention_outputs,
        )
