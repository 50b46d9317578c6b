"""Heads shared by the methods: the token classifier, LargeFOV, the projection head and
Segmenter's mask-transformer decoder."""

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn.utils import parametrizations


class TokenClassifier(nn.Module):
    """A bias-free 1x1 conv D -> C over a token map: image logits and CAMs share it.

    ``logits`` pools the map first (global max in ToCo; global average learns faster
    from scratch), ``cams`` applies the same weights per token.
    """

    def __init__(self, embed_dim: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))
        # nn.Conv2d's default initialisation, as the reference's 1x1 conv has.
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def logits(self, token_map: torch.Tensor, pooling: str = "max") -> torch.Tensor:
        """(B, D, h, w) -> (B, C) from the global ``max`` (ToCo) or ``avg`` of every channel."""
        if pooling == "max":
            pooled = token_map.amax(dim=(2, 3))
        elif pooling == "avg":
            pooled = token_map.mean(dim=(2, 3))
        else:
            raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
        return pooled @ self.weight.t()

    def cams(self, token_map: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, C, h, w) class activation maps (before ReLU)."""
        return torch.einsum("bdhw,cd->bchw", token_map, self.weight)


class LargeFOVHead(nn.Module):
    """DeepLab-LargeFOV head as ToCo uses it: two dilated 3x3 convs and a 1x1, no biases.

    (B, D, h, w) -> (B, num_classes, h, w).
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 512, dilation: int = 5):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, num_classes, 1, bias=False),
        )

    def forward(self, token_map: torch.Tensor) -> torch.Tensor:
        return self.layers(token_map)


class ProjectionHead(nn.Module):
    """ToCo's class-token projection: MLP D -> hidden -> hidden -> bottleneck (GELU),
    L2 normalisation, then a weight-normed bias-free linear bottleneck -> out whose
    weight norm is fixed at 1 (DINO's head). (B, D) -> (B, out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = parametrizations.weight_norm(
            nn.Linear(bottleneck_dim, out_dim, bias=False)
        )
        # The magnitude stays 1: only directions are learnt.
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(features), dim=-1))


class MaskTransformerDecoder(nn.Module):
    """Segmenter's mask transformer (Strudel et al., 2021): K learnt class embeddings go
    through transformer blocks jointly with the projected patch tokens; the masks are the
    products of the L2-normalised patch and class features, layer-normed over classes.

    (B, N, D) patch tokens on an (h, w) grid -> (B, K, h, w) mask logits.

    Args:
        in_dim: D, the encoder width.
        num_classes: K (background included).
        width: the decoder width.
        depth: number of transformer blocks.
        num_heads: attention heads of each block.
        mlp_ratio: MLP width / ``width``.
        dropout: dropout after attention and MLP projections.
        drop_path_rate: stochastic depth, rising linearly to this over the blocks.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        width: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.input_projection = nn.Linear(in_dim, width)
        rates = torch.linspace(0, drop_path_rate, depth).tolist() if depth else []
        self.blocks = nn.ModuleList(
            Block(width, num_heads, mlp_ratio, qkv_bias=True, proj_drop=dropout, drop_path=rate)
            for rate in rates
        )
        self.class_embeddings = nn.Parameter(torch.empty(1, num_classes, width))
        nn.init.trunc_normal_(self.class_embeddings, std=0.02)
        scale = width**-0.5
        self.patch_projection = nn.Parameter(scale * torch.randn(width, width))
        self.class_projection = nn.Parameter(scale * torch.randn(width, width))
        self.decoder_norm = nn.LayerNorm(width)
        self.mask_norm = nn.LayerNorm(num_classes)

    def forward(self, patch_tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        tokens = self.input_projection(patch_tokens)
        class_embeddings = self.class_embeddings.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([tokens, class_embeddings], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.decoder_norm(tokens)
        patches = F.normalize(tokens[:, : -self.num_classes] @ self.patch_projection, dim=-1)
        classes = F.normalize(tokens[:, -self.num_classes :] @ self.class_projection, dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, N, K)
        return masks.transpose(1, 2).reshape(masks.shape[0], self.num_classes, *grid)
