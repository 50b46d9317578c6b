"""Triton kernels of adaptive top-k pooling (APC's adaptive-K pooling).

For each row s = scores[b, c, :]: k = clamp(#{n : s_n >= gamma * max s}, 1, k_max) and
the output is the mean of the k largest entries. One program holds one row.

The k-th largest value is found without sorting: float32 values map to uint32 keys in
the same order, and the key of the k-th largest is built bit by bit, most significant
first, keeping a bit when at least k keys are still >= the candidate (32 counting
passes over the row in registers). Then

    pooled = (sum_{s > v} s + (k - #{s > v}) * v) / k,   v = k-th largest.

The backward gives 1 / k to the selected entries: every entry > v, and among the entries
equal to v the ones with the lowest indices (a stable descending sort's order), as many
as k - #{s > v}. The forward saves only v (float32) and k (int32) per row.
"""

import torch
import triton
import triton.language as tl

# One row lives in registers; beyond this many tokens a row would spill heavily.
MAX_ROW_LENGTH = 65536


@triton.jit
def _load_row(ptr, offs, mask, stride):
    """A row as float32 with -0.0 turned into +0.0, so that the order keys of equal values
    are equal (the sign bit would otherwise rank -0.0 below +0.0)."""
    row = tl.load(ptr + offs.to(tl.int64) * stride, mask=mask, other=0.0).to(tl.float32)
    return tl.where(row == 0.0, 0.0, row)


@triton.jit
def _adaptive_topk_pool_forward_kernel(
    scores_ptr,
    pooled_ptr,
    kth_value_ptr,
    k_ptr,
    C,
    N,
    stride_sb,
    stride_sc,
    stride_sn,
    gamma,
    k_max,
    BLOCK_N: tl.constexpr,
):
    """pooled[b, c] (scores' dtype), kth_value[b, c] (float32), k[b, c] (int32) of one row."""
    row = tl.program_id(0).to(tl.int64)
    scores_ptr += (row // C) * stride_sb + (row % C) * stride_sc
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    s = _load_row(scores_ptr, offs, mask, stride_sn)

    peak = tl.max(tl.where(mask, s, float("-inf")), axis=0)
    count = tl.sum((mask & (s >= gamma * peak)).to(tl.int32), axis=0)
    k = tl.minimum(tl.maximum(count, 1), k_max)

    # Order-preserving keys: flip every bit of negatives, only the sign bit of the rest.
    # Padding gets key 0, below every real value (0 is a NaN's key: NaN is unsupported).
    # (XOR with all ones rather than `~`: Triton >= 3.8's interpreter lowers `~` on
    # uint32 through a Python -1, which it rejects.)
    all_ones = tl.full((), 0xFFFFFFFF, dtype=tl.uint32)
    bits = s.to(tl.uint32, bitcast=True)
    keys = tl.where((bits >> 31) != 0, bits ^ all_ones, bits | 0x80000000)
    keys = tl.where(mask, keys, 0)
    kth_key = tl.zeros((), dtype=tl.uint32)
    for i in range(32):
        candidate = kth_key | (tl.full((), 1, dtype=tl.uint32) << (31 - i))
        at_least = tl.sum((keys >= candidate).to(tl.int32), axis=0)
        kth_key = tl.where(at_least >= k, candidate, kth_key)
    kth_bits = tl.where((kth_key >> 31) != 0, kth_key ^ 0x80000000, kth_key ^ all_ones)
    kth_value = kth_bits.to(tl.float32, bitcast=True)

    above = mask & (s > kth_value)
    count_above = tl.sum(above.to(tl.int32), axis=0)
    total = tl.sum(tl.where(above, s, 0.0), axis=0) + (k - count_above).to(tl.float32) * kth_value
    tl.store(pooled_ptr + row, (total / k.to(tl.float32)).to(pooled_ptr.dtype.element_ty))
    tl.store(kth_value_ptr + row, kth_value)
    tl.store(k_ptr + row, k)


@triton.jit
def _adaptive_topk_pool_backward_kernel(
    grad_pooled_ptr,
    scores_ptr,
    kth_value_ptr,
    k_ptr,
    grad_scores_ptr,
    C,
    N,
    stride_gpb,
    stride_gpc,
    stride_sb,
    stride_sc,
    stride_sn,
    BLOCK_N: tl.constexpr,
):
    """grad_scores[b, c, :] = grad_pooled[b, c] / k on the selected entries, 0 elsewhere."""
    row = tl.program_id(0).to(tl.int64)
    b = row // C
    c = row % C
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    s = _load_row(scores_ptr + b * stride_sb + c * stride_sc, offs, mask, stride_sn)
    kth_value = tl.load(kth_value_ptr + row)
    k = tl.load(k_ptr + row)
    grad = tl.load(grad_pooled_ptr + b * stride_gpb + c * stride_gpc).to(tl.float32)

    above = mask & (s > kth_value)
    tied = mask & (s == kth_value)
    tied_taken = k - tl.sum(above.to(tl.int32), axis=0)
    selected = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= tied_taken))
    grad_row = tl.where(selected, grad / k.to(tl.float32), 0.0)
    tl.store(
        grad_scores_ptr + row * N + offs,
        grad_row.to(grad_scores_ptr.dtype.element_ty),
        mask=mask,
    )


def _num_warps(block_n: int) -> int:
    return min(16, max(4, block_n // 512))


def adaptive_topk_pool_forward(
    scores: torch.Tensor, gamma: float, k_max: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward.

    Args:
        scores: (B, C, N) float32/bf16/fp16, any strides, N <= MAX_ROW_LENGTH.
        gamma: threshold ratio (>= 0).
        k_max: upper bound of k, 1 <= k_max <= N.

    Returns:
        pooled: (B, C) in the scores' dtype.
        kth_value: (B, C) float32, the k-th largest score of each row.
        k: (B, C) int32.
    """
    batch, channels, length = scores.shape
    block_n = triton.next_power_of_2(length)
    pooled = torch.empty((batch, channels), dtype=scores.dtype, device=scores.device)
    kth_value = torch.empty((batch, channels), dtype=torch.float32, device=scores.device)
    k = torch.empty((batch, channels), dtype=torch.int32, device=scores.device)
    _adaptive_topk_pool_forward_kernel[(batch * channels,)](
        scores,
        pooled,
        kth_value,
        k,
        channels,
        length,
        *scores.stride(),
        gamma,
        k_max,
        BLOCK_N=block_n,
        num_warps=_num_warps(block_n),
    )
    return pooled, kth_value, k


def adaptive_topk_pool_backward(
    grad_pooled: torch.Tensor, scores: torch.Tensor, kth_value: torch.Tensor, k: torch.Tensor
) -> torch.Tensor:
    """Fused backward: (B, C, N) contiguous gradient in the scores' dtype."""
    batch, channels, length = scores.shape
    block_n = triton.next_power_of_2(length)
    grad_scores = torch.empty((batch, channels, length), dtype=scores.dtype, device=scores.device)
    _adaptive_topk_pool_backward_kernel[(batch * channels,)](
        grad_pooled,
        scores,
        kth_value,
        k,
        grad_scores,
        channels,
        length,
        *grad_pooled.stride(),
        *scores.stride(),
        BLOCK_N=block_n,
        num_warps=_num_warps(block_n),
    )
    return grad_scores
