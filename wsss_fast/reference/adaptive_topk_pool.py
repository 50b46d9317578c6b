"""Adaptive top-k pooling in plain PyTorch: sort every row, keep the first k.

APC publishes no code; this follows the top-k pooling of its predecessors (a full
descending sort of the patch scores, a rank mask, a masked mean). Ground truth for tests
and the benchmark baseline.
"""

import torch


def adaptive_topk_pool(
    scores: torch.Tensor, *, gamma: float = 0.5, k_max: int | None = None
) -> torch.Tensor:
    """Mean of the k largest scores per row, k = clamp(#{s >= gamma * max s}, 1, k_max).

    Args:
        scores: (B, C, N) float scores (computed in float32).
        gamma: threshold ratio; >= 1 gives max pooling, 0 with ``k_max`` a fixed top-k.
        k_max: upper bound of k (None: N).

    Returns:
        (B, C) in the scores' dtype. The gradient goes, 1 / k each, to the first k entries
        of a stable descending sort: among equal scores, the lowest indices.
    """
    num_tokens = scores.shape[-1]
    k_max = num_tokens if k_max is None else min(k_max, num_tokens)
    scores32 = scores.float()
    peak = scores32.amax(dim=-1, keepdim=True)
    k = (scores32 >= gamma * peak).sum(dim=-1).clamp(1, k_max)
    sorted_scores, _ = torch.sort(scores32, dim=-1, descending=True, stable=True)
    rank = torch.arange(num_tokens, device=scores.device)
    selected = rank < k.unsqueeze(-1)
    pooled = (sorted_scores * selected).sum(dim=-1) / k
    return pooled.to(scores.dtype)
