"""Triton kernels of the token-similarity contrast loss (ToCo's PTC, APC's PCL).

With x_i = t_i / max(||t_i||, eps) the L2-normalised tokens, c_ij = x_i . x_j and
s_ij = |c_ij| (absolute) or c_ij, the loss over the ordered pairs i != j of one image
whose labels are both valid is

    L = 0.5 * (1 - sum_pos s / (n_pos + 1)) + 0.5 * sum_neg max(s - margin, 0) / (n_neg + 1)

with sums and counts pooled over the batch. No kernel holds more than a
(BLOCK_I, BLOCK_J) tile of the N x N similarity: each tile is recomputed from the tokens
(c_ij = (t_i . t_j) / (n_i n_j)) wherever it is needed.

- ``_token_norms_kernel``: the token norms, (B, N) float32, kept for the backward.
- ``_token_contrast_forward_kernel``: per (image, block of rows i, range of columns j):
  per-row partial sums and pair counts, written to small (SPLIT_J, B * N, 2) buffers.
- ``_token_contrast_finalize_kernel``: one program sums the partials in a fixed order
  (deterministic, no atomics) and writes the loss and the two pair weights
  1 / (n_pos + 1), 1 / (n_neg + 1), which are all the backward needs besides the norms.
- ``_token_contrast_backward_kernel``: per (image, block of rows i, slice of D): walks
  the columns j, recomputes the similarity tile, turns it into dL/dc_ij and accumulates
  sum_j dL/dc_ij x_j for its slice of D, then applies the backward of the L2
  normalisation. Extra memory of the whole op: O(B * N) plus the (B, N, D) gradient.
"""

import os

import torch
import triton
import triton.language as tl

# ToCo normalises the tokens with F.normalize(..., eps=1e-8).
NORMALIZE_EPS = 1e-8


@triton.jit
def _token_norms_kernel(
    tokens_ptr,
    norms_ptr,
    N,
    D,
    stride_tb,
    stride_tn,
    stride_td,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """norms[b, n] = ||tokens[b, n, :]|| in float32, for a block of BLOCK_R tokens."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < N
    row_ptrs = tokens_ptr + pid_b * stride_tb + offs_r.to(tl.int64)[:, None] * stride_tn
    squares = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_r[:, None] & (offs_k < D)[None, :]
        x = tl.load(row_ptrs + offs_k[None, :] * stride_td, mask=mask, other=0.0).to(tl.float32)
        squares += tl.sum(x * x, axis=1)
    tl.store(norms_ptr + pid_b * N + offs_r, tl.sqrt(squares), mask=mask_r)


@triton.jit
def _dot_tile(
    tokens_ptr,
    offs_i,
    mask_i,
    offs_j,
    mask_j,
    D,
    stride_tn,
    stride_td,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(BLOCK_I, BLOCK_J) float32 tile of raw dot products t_i . t_j of one image.

    The operands stay in the tokens' dtype on a GPU (bf16/fp16 products are exact in
    the float32 accumulator); DOT_DTYPE is float32 under the interpreter.
    """
    rows_i = tokens_ptr + offs_i.to(tl.int64)[:, None] * stride_tn
    # The j tokens are loaded as a (BLOCK_K, BLOCK_J) tile: the transposed operand.
    cols_j = tokens_ptr + offs_j.to(tl.int64)[None, :] * stride_tn
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < D
        a = tl.load(
            rows_i + offs_k[None, :] * stride_td,
            mask=mask_i[:, None] & mask_k[None, :],
            other=0.0,
        )
        b = tl.load(
            cols_j + offs_k[:, None] * stride_td,
            mask=mask_k[:, None] & mask_j[None, :],
            other=0.0,
        )
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _pair_masks(offs_i, valid_i, label_i, offs_j, valid_j, label_j):
    """Positive and negative pairs of a tile: i != j, both valid; equal labels or not."""
    pair = valid_i[:, None] & valid_j[None, :] & (offs_i[:, None] != offs_j[None, :])
    same = label_i[:, None] == label_j[None, :]
    return pair & same, pair & (~same)


@triton.jit
def _token_contrast_forward_kernel(
    tokens_ptr,
    labels_ptr,
    norms_ptr,
    row_sums_ptr,
    row_counts_ptr,
    N,
    D,
    stride_tb,
    stride_tn,
    stride_td,
    stride_lb,
    stride_ln,
    ignore_index,
    margin,
    eps,
    J_BLOCKS_PER_SPLIT,
    ABSOLUTE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Partial sums over the pairs (i, j) of rows i of one block and columns j of one split.

    Writes, for each row i, [sum_pos s, sum_neg max(s - margin, 0)] (float32) and
    [n_pos, n_neg] (int32) at row split * B * N + b * N + i of the partial buffers.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1)
    pid_split = tl.program_id(2).to(tl.int64)
    num_rows = tl.num_programs(0).to(tl.int64) * N
    tokens_ptr += pid_b * stride_tb
    labels_ptr += pid_b * stride_lb
    norms_ptr += pid_b * N

    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < N
    label_i = tl.load(labels_ptr + offs_i.to(tl.int64) * stride_ln, mask=mask_i, other=0)
    valid_i = mask_i & (label_i != ignore_index)
    inv_norm_i = 1.0 / tl.maximum(tl.load(norms_ptr + offs_i, mask=mask_i, other=1.0), eps)

    pos_sum = tl.zeros((BLOCK_I,), dtype=tl.float32)
    neg_sum = tl.zeros((BLOCK_I,), dtype=tl.float32)
    pos_count = tl.zeros((BLOCK_I,), dtype=tl.int32)
    neg_count = tl.zeros((BLOCK_I,), dtype=tl.int32)
    j_start = pid_split * J_BLOCKS_PER_SPLIT * BLOCK_J
    j_end = tl.minimum(j_start + J_BLOCKS_PER_SPLIT * BLOCK_J, N)
    for j0 in range(j_start, j_end, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < N
        label_j = tl.load(labels_ptr + offs_j.to(tl.int64) * stride_ln, mask=mask_j, other=0)
        valid_j = mask_j & (label_j != ignore_index)
        inv_norm_j = 1.0 / tl.maximum(tl.load(norms_ptr + offs_j, mask=mask_j, other=1.0), eps)

        dots = _dot_tile(
            tokens_ptr,
            offs_i,
            mask_i,
            offs_j,
            mask_j,
            D,
            stride_tn,
            stride_td,
            DOT_DTYPE,
            INPUT_PRECISION,
            BLOCK_I,
            BLOCK_J,
            BLOCK_K,
        )
        cosine = dots * inv_norm_i[:, None] * inv_norm_j[None, :]
        if ABSOLUTE:
            similarity = tl.abs(cosine)
        else:
            similarity = cosine
        is_pos, is_neg = _pair_masks(offs_i, valid_i, label_i, offs_j, valid_j, label_j)
        pos_sum += tl.sum(tl.where(is_pos, similarity, 0.0), axis=1)
        neg_sum += tl.sum(tl.where(is_neg, tl.maximum(similarity - margin, 0.0), 0.0), axis=1)
        pos_count += tl.sum(is_pos.to(tl.int32), axis=1)
        neg_count += tl.sum(is_neg.to(tl.int32), axis=1)

    rows = pid_split * num_rows + pid_b * N + offs_i
    tl.store(row_sums_ptr + rows * 2, pos_sum, mask=mask_i)
    tl.store(row_sums_ptr + rows * 2 + 1, neg_sum, mask=mask_i)
    tl.store(row_counts_ptr + rows * 2, pos_count, mask=mask_i)
    tl.store(row_counts_ptr + rows * 2 + 1, neg_count, mask=mask_i)


@triton.jit
def _token_contrast_finalize_kernel(
    row_sums_ptr,
    row_counts_ptr,
    loss_ptr,
    pair_weights_ptr,
    num_rows,
    BLOCK: tl.constexpr,
):
    """Single program: loss and pair weights [1 / (n_pos + 1), 1 / (n_neg + 1)]."""
    pos_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    neg_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    # int64: the pooled pair counts reach B * N^2, beyond float32's exact integers.
    pos_count = tl.zeros((BLOCK,), dtype=tl.int64)
    neg_count = tl.zeros((BLOCK,), dtype=tl.int64)
    for start in range(0, num_rows, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        mask = rows < num_rows
        pos_sum += tl.load(row_sums_ptr + rows * 2, mask=mask, other=0.0)
        neg_sum += tl.load(row_sums_ptr + rows * 2 + 1, mask=mask, other=0.0)
        pos_count += tl.load(row_counts_ptr + rows * 2, mask=mask, other=0).to(tl.int64)
        neg_count += tl.load(row_counts_ptr + rows * 2 + 1, mask=mask, other=0).to(tl.int64)
    pos_weight = 1.0 / (tl.sum(pos_count, axis=0).to(tl.float32) + 1.0)
    neg_weight = 1.0 / (tl.sum(neg_count, axis=0).to(tl.float32) + 1.0)
    loss = 0.5 * (1.0 - tl.sum(pos_sum, axis=0) * pos_weight)
    loss += 0.5 * tl.sum(neg_sum, axis=0) * neg_weight
    tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))
    tl.store(pair_weights_ptr, pos_weight)
    tl.store(pair_weights_ptr + 1, neg_weight)


@triton.jit
def _token_contrast_backward_kernel(
    grad_loss_ptr,
    tokens_ptr,
    labels_ptr,
    norms_ptr,
    pair_weights_ptr,
    grad_tokens_ptr,
    N,
    D,
    stride_tb,
    stride_tn,
    stride_td,
    stride_lb,
    stride_ln,
    stride_gb,
    stride_gn,
    stride_gd,
    ignore_index,
    margin,
    eps,
    ABSOLUTE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    GRAD_DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    """dL/dt for a block of rows i and a BLOCK_DO-wide slice of D of one image.

    dL/dx_i = 2 sum_j w_ij x_j with w_ij = dL/dc_ij (the pair rule is symmetric, so
    (i, j) and (j, i) contribute alike), then through x = t / max(||t||, eps):
    dL/dt_i = (dL/dx_i - x_i (x_i . dL/dx_i)) / ||t_i|| when ||t_i|| >= eps, else
    dL/dx_i / eps, as autograd of F.normalize gives. x_i . dL/dx_i = 2 sum_j w_ij c_ij
    is a row sum of the tile, so a program needs no other slice of D.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1)
    pid_d = tl.program_id(2)
    tokens_ptr += pid_b * stride_tb
    labels_ptr += pid_b * stride_lb
    norms_ptr += pid_b * N
    grad_tokens_ptr += pid_b * stride_gb

    grad_loss = tl.load(grad_loss_ptr).to(tl.float32)
    pos_coef = -0.5 * grad_loss * tl.load(pair_weights_ptr)
    neg_coef = 0.5 * grad_loss * tl.load(pair_weights_ptr + 1)

    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < N
    label_i = tl.load(labels_ptr + offs_i.to(tl.int64) * stride_ln, mask=mask_i, other=0)
    valid_i = mask_i & (label_i != ignore_index)
    norm_i = tl.load(norms_ptr + offs_i, mask=mask_i, other=1.0)
    inv_norm_i = 1.0 / tl.maximum(norm_i, eps)
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mask_do = offs_do < D

    grad_x = tl.zeros((BLOCK_I, BLOCK_DO), dtype=tl.float32)
    projection = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for j0 in range(0, N, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < N
        label_j = tl.load(labels_ptr + offs_j.to(tl.int64) * stride_ln, mask=mask_j, other=0)
        valid_j = mask_j & (label_j != ignore_index)
        inv_norm_j = 1.0 / tl.maximum(tl.load(norms_ptr + offs_j, mask=mask_j, other=1.0), eps)

        dots = _dot_tile(
            tokens_ptr,
            offs_i,
            mask_i,
            offs_j,
            mask_j,
            D,
            stride_tn,
            stride_td,
            DOT_DTYPE,
            INPUT_PRECISION,
            BLOCK_I,
            BLOCK_J,
            BLOCK_K,
        )
        cosine = dots * inv_norm_i[:, None] * inv_norm_j[None, :]
        is_pos, is_neg = _pair_masks(offs_i, valid_i, label_i, offs_j, valid_j, label_j)
        if ABSOLUTE:
            # d|c|/dc = sign(c), 0 at c = 0 as torch.abs's backward.
            sign = tl.where(cosine > 0, 1.0, tl.where(cosine < 0, -1.0, 0.0))
            # relu's backward: no gradient where s - margin is exactly 0.
            active = is_neg & (tl.abs(cosine) - margin > 0)
            d_cosine = tl.where(is_pos, pos_coef, tl.where(active, neg_coef, 0.0)) * sign
        else:
            active = is_neg & (cosine - margin > 0)
            d_cosine = tl.where(is_pos, pos_coef, tl.where(active, neg_coef, 0.0))
        projection += tl.sum(d_cosine * cosine, axis=1)

        # sum_j w_ij x_j = sum_j (w_ij / ||t_j||) t_j: scale the (BLOCK_I, BLOCK_J) weights,
        # not the (BLOCK_J, BLOCK_DO) tokens, and feed the tokens to the dot as stored.
        x_j = tl.load(
            tokens_ptr + offs_j.to(tl.int64)[:, None] * stride_tn + offs_do[None, :] * stride_td,
            mask=mask_j[:, None] & mask_do[None, :],
            other=0.0,
        )
        weights = (d_cosine * inv_norm_j[None, :]).to(GRAD_DOT_DTYPE)
        grad_x = tl.dot(weights, x_j.to(GRAD_DOT_DTYPE), grad_x, input_precision=INPUT_PRECISION)

    grad_x *= 2.0
    projection *= 2.0
    t_i = tl.load(
        tokens_ptr + offs_i.to(tl.int64)[:, None] * stride_tn + offs_do[None, :] * stride_td,
        mask=mask_i[:, None] & mask_do[None, :],
        other=0.0,
    ).to(tl.float32)
    x_i = t_i * inv_norm_i[:, None]
    # Below eps F.normalize divides by the constant eps: no projection term.
    through_norm = (norm_i >= eps)[:, None]
    grad_t = tl.where(through_norm, grad_x - x_i * projection[:, None], grad_x)
    grad_t *= inv_norm_i[:, None]
    tl.store(
        grad_tokens_ptr + offs_i.to(tl.int64)[:, None] * stride_gn + offs_do[None, :] * stride_gd,
        grad_t.to(grad_tokens_ptr.dtype.element_ty),
        mask=mask_i[:, None] & mask_do[None, :],
    )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


_DOT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _launch_config(tokens: torch.Tensor) -> dict:
    """Block sizes and dot dtypes for ``tokens``.

    Under the interpreter: float32 dots (its bf16 arithmetic is broken) and small blocks,
    so that the small test shapes still cover several k steps, D slices and j splits.
    """
    if _interpreting() or not tokens.is_cuda:
        return {
            "dot_dtype": tl.float32,
            "grad_dot_dtype": tl.float32,
            "input_precision": "ieee",
            "block_i": 16,
            "block_j": 16,
            "block_k": 16,
            "block_do": 32,
            "target_programs": 16,
            "num_warps": 1,
        }
    dtype = tokens.dtype
    # float32 follows torch's matmul setting (TF32 off by default, as in the reference);
    # fp16 runs its gradient dot in float32 (see below), where TF32 keeps fp16's mantissa.
    use_tf32 = dtype == torch.float16 or torch.backends.cuda.matmul.allow_tf32
    sm_count = torch.cuda.get_device_properties(tokens.device).multi_processor_count
    return {
        "dot_dtype": _DOT_DTYPES[dtype],
        # The gradient weights are ~1 / n_pairs: below fp16's range, fine in bf16's.
        "grad_dot_dtype": tl.bfloat16 if dtype == torch.bfloat16 else tl.float32,
        "input_precision": "tf32" if use_tf32 else "ieee",
        "block_i": 64,
        "block_j": 64,
        "block_k": 64 if dtype != torch.float32 else 32,
        # A (64, 256) float32 accumulator is 64 registers a thread with 8 warps.
        # (tl.dot needs every dimension >= 16.)
        "block_do": max(16, min(256, triton.next_power_of_2(tokens.shape[2]))),
        # Enough programs to fill the GPU twice over.
        "target_programs": 2 * sm_count,
        "num_warps": 4,
    }


def token_contrast_forward(
    tokens: torch.Tensor, labels: torch.Tensor, ignore_index: int, absolute: bool, margin: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward.

    Args:
        tokens: (B, N, D) float32/bf16/fp16, any strides.
        labels: (B, N) integer token labels, any strides.

    Returns:
        loss: 0-d tensor in the tokens' dtype (computed in float32).
        norms: (B, N) float32 token norms.
        pair_weights: (2,) float32 [1 / (n_pos + 1), 1 / (n_neg + 1)].
    """
    batch, num_tokens, dim = tokens.shape
    config = _launch_config(tokens)
    device = tokens.device
    block_i, block_j = config["block_i"], config["block_j"]

    norms = torch.empty((batch, num_tokens), dtype=torch.float32, device=device)
    _token_norms_kernel[(batch, triton.cdiv(num_tokens, block_i))](
        tokens,
        norms,
        num_tokens,
        dim,
        *tokens.stride(),
        BLOCK_R=block_i,
        BLOCK_K=config["block_k"],
        num_warps=config["num_warps"],
    )

    # Few images and short sequences leave SMs idle: split the columns j as well.
    i_blocks = triton.cdiv(num_tokens, block_i)
    j_blocks = triton.cdiv(num_tokens, block_j)
    splits = min(j_blocks, max(1, triton.cdiv(config["target_programs"], batch * i_blocks)))
    j_blocks_per_split = triton.cdiv(j_blocks, splits)
    splits = triton.cdiv(j_blocks, j_blocks_per_split)
    row_sums = torch.empty((splits, batch * num_tokens, 2), dtype=torch.float32, device=device)
    row_counts = torch.empty((splits, batch * num_tokens, 2), dtype=torch.int32, device=device)
    _token_contrast_forward_kernel[(batch, i_blocks, splits)](
        tokens,
        labels,
        norms,
        row_sums,
        row_counts,
        num_tokens,
        dim,
        *tokens.stride(),
        *labels.stride(),
        ignore_index,
        margin,
        NORMALIZE_EPS,
        j_blocks_per_split,
        ABSOLUTE=absolute,
        DOT_DTYPE=config["dot_dtype"],
        INPUT_PRECISION=config["input_precision"],
        BLOCK_I=block_i,
        BLOCK_J=block_j,
        BLOCK_K=config["block_k"],
        num_warps=config["num_warps"],
    )

    loss = torch.empty((), dtype=tokens.dtype, device=device)
    pair_weights = torch.empty((2,), dtype=torch.float32, device=device)
    _token_contrast_finalize_kernel[(1,)](
        row_sums,
        row_counts,
        loss,
        pair_weights,
        splits * batch * num_tokens,
        BLOCK=1024,
        num_warps=config["num_warps"],
    )
    return loss, norms, pair_weights


def token_contrast_backward(
    grad_loss: torch.Tensor,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    norms: torch.Tensor,
    pair_weights: torch.Tensor,
    ignore_index: int,
    absolute: bool,
    margin: float,
) -> torch.Tensor:
    """Fused backward: (B, N, D) gradient in the tokens' dtype, from the forward's outputs."""
    batch, num_tokens, dim = tokens.shape
    config = _launch_config(tokens)
    grad_tokens = torch.empty((batch, num_tokens, dim), dtype=tokens.dtype, device=tokens.device)
    grid = (
        batch,
        triton.cdiv(num_tokens, config["block_i"]),
        triton.cdiv(dim, config["block_do"]),
    )
    _token_contrast_backward_kernel[grid](
        grad_loss,
        tokens,
        labels,
        norms,
        pair_weights,
        grad_tokens,
        num_tokens,
        dim,
        *tokens.stride(),
        *labels.stride(),
        *grad_tokens.stride(),
        ignore_index,
        margin,
        NORMALIZE_EPS,
        ABSOLUTE=absolute,
        DOT_DTYPE=config["dot_dtype"],
        GRAD_DOT_DTYPE=config["grad_dot_dtype"],
        INPUT_PRECISION=config["input_precision"],
        BLOCK_I=config["block_i"],
        BLOCK_J=config["block_j"],
        BLOCK_K=config["block_k"],
        BLOCK_DO=config["block_do"],
        num_warps=2 * config["num_warps"],
    )
    return grad_tokens
