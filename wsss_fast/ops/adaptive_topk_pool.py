"""Adaptive top-k pooling: APC's adaptive-K pooling of patch scores into image scores.

For each row s = scores[b, c, :]: k = clamp(#{n : s_n >= gamma * max s}, 1, k_max) and
the output is the mean of the k largest scores; the gradient is 1 / k on each selected
score. gamma >= 1 gives max pooling (k = the number of entries tied at the maximum),
gamma = 0 with ``k_max`` a fixed top-k.

Ties: when entries equal to the k-th largest value straddle the cut, the ones with the
lowest indices are selected (the order of a stable descending sort). The output does not
depend on this choice, only which entries receive the gradient.

The fused op ``torch.ops.wsss_fast.adaptive_topk_pool`` runs one Triton program per row
(see ``wsss_fast.kernels.adaptive_topk_pool``); the reference sorts every row.
"""

import math
from numbers import Integral, Real

import torch

from wsss_fast.ops._backend import resolve_backend

SUPPORTED_BACKENDS = ("triton", "reference")
SCORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.library.custom_op("wsss_fast::adaptive_topk_pool", mutates_args=())
def _adaptive_topk_pool_op(
    scores: torch.Tensor, gamma: float, k_max: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (pooled (B, C), k-th largest value (B, C) float32, k (B, C) int32)."""
    from wsss_fast.kernels.adaptive_topk_pool import adaptive_topk_pool_forward

    return adaptive_topk_pool_forward(scores, gamma, k_max)


@_adaptive_topk_pool_op.register_fake
def _adaptive_topk_pool_fake(scores, gamma, k_max):
    batch, channels, _ = scores.shape
    return (
        scores.new_empty((batch, channels)),
        scores.new_empty((batch, channels), dtype=torch.float32),
        scores.new_empty((batch, channels), dtype=torch.int32),
    )


@torch.library.custom_op("wsss_fast::adaptive_topk_pool_backward", mutates_args=())
def _adaptive_topk_pool_backward_op(
    grad_pooled: torch.Tensor, scores: torch.Tensor, kth_value: torch.Tensor, k: torch.Tensor
) -> torch.Tensor:
    """(B, C, N) gradient w.r.t. the scores, in their dtype."""
    from wsss_fast.kernels.adaptive_topk_pool import adaptive_topk_pool_backward

    return adaptive_topk_pool_backward(grad_pooled, scores, kth_value, k)


@_adaptive_topk_pool_backward_op.register_fake
def _adaptive_topk_pool_backward_fake(grad_pooled, scores, kth_value, k):
    return scores.new_empty(scores.shape)


def _setup_context(ctx, inputs, output):
    scores, _, _ = inputs
    _, kth_value, k = output
    # Selection statistics for the backward, not results.
    ctx.mark_non_differentiable(kth_value, k)
    ctx.save_for_backward(scores, kth_value, k)


def _backward(ctx, grad_pooled, _grad_kth_value, _grad_k):
    scores, kth_value, k = ctx.saved_tensors
    grad_scores = None
    if ctx.needs_input_grad[0]:
        grad_scores = _adaptive_topk_pool_backward_op(grad_pooled, scores, kth_value, k)
    return grad_scores, None, None


_adaptive_topk_pool_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(scores, gamma, k_max) -> None:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 3:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a (B, C, N) tensor, got {got}")
    if scores.dtype not in SCORE_DTYPES:
        raise ValueError(f"scores must be float32, bfloat16 or float16, got {scores.dtype}")
    if scores.shape[-1] == 0:
        raise ValueError(
            f"scores must have N >= 1 entries per row, got shape {tuple(scores.shape)}"
        )
    if isinstance(gamma, bool) or not isinstance(gamma, Real) or not math.isfinite(gamma):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma!r}")
    if k_max is not None and (
        isinstance(k_max, bool) or not isinstance(k_max, Integral) or k_max < 1
    ):
        raise ValueError(f"k_max must be None or an int >= 1, got {k_max!r}")


def adaptive_topk_pool(
    scores: torch.Tensor,
    *,
    gamma: float = 0.5,
    k_max: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Pools (B, C, N) scores into (B, C): the mean of each row's k largest scores.

    Args:
        scores: (B, C, N) float32, bfloat16 or float16 non-negative scores (patch
            probabilities), any strides; N <= 65536 for the triton backend.
        gamma: k counts the scores >= gamma * (row max); >= 1 is max pooling.
        k_max: upper bound of k (None: N; larger than N: N).
        backend: ``triton``, ``reference`` or ``auto`` (default: ``WSSS_FAST_BACKEND``,
            else auto: Triton on CUDA tensors, the reference on CPU tensors).

    Returns:
        (B, C) in the scores' dtype (computed in float32).
    """
    _check_inputs(scores, gamma, k_max)
    chosen = resolve_backend("adaptive_topk_pool", scores.device, SUPPORTED_BACKENDS, backend)
    if chosen == "reference":
        from wsss_fast.reference.adaptive_topk_pool import adaptive_topk_pool as reference

        return reference(scores, gamma=float(gamma), k_max=k_max)
    from wsss_fast.kernels.adaptive_topk_pool import MAX_ROW_LENGTH

    num_tokens = scores.shape[-1]
    if num_tokens > MAX_ROW_LENGTH:
        raise ValueError(
            f"scores rows longer than {MAX_ROW_LENGTH} are not supported by the triton backend "
            f"(one row per program), got N = {num_tokens}; use backend='reference'"
        )
    k_bound = num_tokens if k_max is None else min(int(k_max), num_tokens)
    pooled, _, _ = _adaptive_topk_pool_op(scores, float(gamma), k_bound)
    return pooled
