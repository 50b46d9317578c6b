"""Adaptive attention fusion in plain PyTorch, structured as WeakTr's reference code.

WeakTr (``models.py: WeakTr.forward`` and ``AAF.py``) keeps every block's softmax
attention map, stacks them into a (B, L*H, N, N) tensor, multiplies it by the
per-map weights expanded to that shape and averages over the maps. This module
does the same from the queries and keys. Ground truth for tests and the benchmark
baseline.
"""

import torch


def attention_maps(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, G, N, Dh) queries and keys -> (B, G, N, N) softmax(q k^T * scale), as a ViT
    block computes its attention."""
    attn = (q @ k.transpose(-2, -1)) * scale
    return attn.softmax(dim=-1)


def fuse_attention_maps(
    q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """Mean over the G = L*H maps of weights * softmax(q k^T * scale).

    Args:
        q, k: (B, G, N, Dh) float queries and keys of every head of every layer.
        weights: (B, G) float per-map weights.
        scale: logit scale (default Dh^-0.5).

    Returns:
        (B, N, N) in the type promotion of q and weights (computed in it).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    maps = attention_maps(q, k, scale)
    batch, num_maps = weights.shape
    weighted = maps * weights.view(batch, num_maps, 1, 1).expand_as(maps)
    return weighted.mean(dim=1)
