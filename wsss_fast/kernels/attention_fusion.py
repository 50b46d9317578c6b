"""Triton kernels of adaptive attention fusion (WeakTr's AAF) from queries and keys.

For G = L*H maps with queries and keys q_g, k_g (N, Dh) of one image, weights w_g and
P_g = softmax(q_g k_g^T * scale),

    out = (1 / G) sum_g w_g P_g                                    (N, N)

No kernel holds a map: each (BLOCK_I, BLOCK_J) tile of P_g is recomputed from q and k
wherever it is needed, flash-attention style. Logits are kept in base 2
(s = q.k * scale * log2(e)), so exp2 does the exponentials.

- ``_row_stats_kernel``: per (block of rows i, map): a pass over the columns j with an
  online max and sum gives lse_g,i = log2 sum_j 2^s_ij, (B, G, N) float32, kept for
  the backward (1/N of a map's size).
- ``_fuse_maps_kernel``: per (block of columns j, block of rows i, image): loops over
  the G maps, accumulating w_g 2^(s_ij - lse_g,i) in float32 registers; writes the
  (B, N, N) output once, in the inputs' dtype.

Backward, with dOut the output's gradient and D_g,i = sum_j dOut_ij P_g,ij:

    dw_g = (1 / G) sum_i D_g,i
    dS_g = (w_g / G) P_g * (dOut - D_g)          (softmax backward, D_g broadcast on j)
    dq_g = scale * dS_g k_g,   dk_g = scale * dS_g^T q_g

- ``_row_dots_kernel``: D (B, G, N) float32, a pass over j per (block of i, map). It is
  all the weights' gradient needs: WeakTr's maps are detached, and then only this
  kernel runs.
- ``_grad_q_kernel``: per (block of i, map), a pass over j accumulating dS k.
- ``_grad_k_kernel``: per (block of j, map), a pass over i accumulating dS^T q; it
  computes the transposed tiles directly (k q^T), so no tile is transposed in registers.
  Both keep w_g / G out of the tiles and apply it once at the end: the tiles fed to
  the gradient dots keep the magnitude of P * dOut (a mean over 72 maps would
  otherwise shrink them towards the bottom of the half-precision range).
"""

import os

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634
# Query / key tiles and gradient accumulators span the whole head dimension in
# registers: no spills up to Dh 64 in float32 and 128 in half precision (ptxas, sm_90),
# some at 256; wider heads would spill without bound.
MAX_HEAD_DIM = 256


@triton.jit
def _row_stats_kernel(
    q_ptr,
    k_ptr,
    lse_ptr,
    G,
    N,
    Dh,
    stride_qb,
    stride_qg,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kg,
    stride_kn,
    stride_kd,
    qk_scale,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """lse[b, g, i] = log2 sum_j 2^(q_i . k_j * qk_scale) for a block of rows of one map."""
    pid_i = tl.program_id(0)
    pid_bg = tl.program_id(1).to(tl.int64)
    q_ptr += (pid_bg // G) * stride_qb + (pid_bg % G) * stride_qg
    k_ptr += (pid_bg // G) * stride_kb + (pid_bg % G) * stride_kg
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < N
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < Dh
    q = tl.load(
        q_ptr + offs_i.to(tl.int64)[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=mask_i[:, None] & mask_d[None, :],
        other=0.0,
    ).to(DOT_DTYPE)

    row_max = tl.full((BLOCK_I,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for j0 in range(0, N, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < N
        k_t = tl.load(
            k_ptr + offs_d[:, None] * stride_kd + offs_j.to(tl.int64)[None, :] * stride_kn,
            mask=mask_d[:, None] & mask_j[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        logits = tl.dot(q, k_t, input_precision=INPUT_PRECISION) * qk_scale
        logits = tl.where(mask_j[None, :], logits, float("-inf"))
        # The first block holds column 0, so the running max is finite from then on.
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(
            tl.exp2(logits - new_max[:, None]), axis=1
        )
        row_max = new_max
    tl.store(lse_ptr + pid_bg * N + offs_i, row_max + tl.log2(row_sum), mask=mask_i)


@triton.jit
def _fuse_maps_kernel(
    q_ptr,
    k_ptr,
    weights_ptr,
    lse_ptr,
    out_ptr,
    G,
    N,
    Dh,
    stride_qb,
    stride_qg,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kg,
    stride_kn,
    stride_kd,
    stride_wb,
    stride_wg,
    stride_ob,
    stride_oi,
    stride_oj,
    qk_scale,
    inv_maps,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[b, i, j] = inv_maps * sum_g w[b, g] * 2^(s_g,ij - lse[b, g, i]) for one tile."""
    pid_j = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < N
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_j = offs_j < N
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < Dh
    q_ptrs = (
        q_ptr
        + pid_b * stride_qb
        + offs_i.to(tl.int64)[:, None] * stride_qn
        + offs_d[None, :] * stride_qd
    )
    k_ptrs = (
        k_ptr
        + pid_b * stride_kb
        + offs_d[:, None] * stride_kd
        + offs_j.to(tl.int64)[None, :] * stride_kn
    )
    lse_ptrs = lse_ptr + pid_b * G * N + offs_i
    weights_ptr += pid_b * stride_wb

    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for _ in range(G):
        q = tl.load(q_ptrs, mask=mask_i[:, None] & mask_d[None, :], other=0.0).to(DOT_DTYPE)
        k_t = tl.load(k_ptrs, mask=mask_d[:, None] & mask_j[None, :], other=0.0).to(DOT_DTYPE)
        lse = tl.load(lse_ptrs, mask=mask_i, other=0.0)
        weight = tl.load(weights_ptr).to(tl.float32)
        logits = tl.dot(q, k_t, input_precision=INPUT_PRECISION) * qk_scale
        # Padded rows and columns give junk (inf at worst), never stored.
        acc += weight * tl.exp2(logits - lse[:, None])
        q_ptrs += stride_qg
        k_ptrs += stride_kg
        lse_ptrs += N
        weights_ptr += stride_wg

    out_ptrs = (
        out_ptr
        + pid_b * stride_ob
        + offs_i.to(tl.int64)[:, None] * stride_oi
        + offs_j.to(tl.int64)[None, :] * stride_oj
    )
    tl.store(
        out_ptrs,
        (acc * inv_maps).to(out_ptr.dtype.element_ty),
        mask=mask_i[:, None] & mask_j[None, :],
    )


@triton.jit
def _row_dots_kernel(
    grad_ptr,
    q_ptr,
    k_ptr,
    lse_ptr,
    row_dots_ptr,
    G,
    N,
    Dh,
    stride_gb,
    stride_gi,
    stride_gj,
    stride_qb,
    stride_qg,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kg,
    stride_kn,
    stride_kd,
    qk_scale,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """row_dots[b, g, i] = sum_j dOut[b, i, j] * P_g[i, j] for a block of rows of one map."""
    pid_i = tl.program_id(0)
    pid_bg = tl.program_id(1).to(tl.int64)
    pid_b = pid_bg // G
    q_ptr += pid_b * stride_qb + (pid_bg % G) * stride_qg
    k_ptr += pid_b * stride_kb + (pid_bg % G) * stride_kg
    grad_ptr += pid_b * stride_gb
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < N
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < Dh
    q = tl.load(
        q_ptr + offs_i.to(tl.int64)[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=mask_i[:, None] & mask_d[None, :],
        other=0.0,
    ).to(DOT_DTYPE)
    lse = tl.load(lse_ptr + pid_bg * N + offs_i, mask=mask_i, other=0.0)

    row_dots = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for j0 in range(0, N, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < N
        k_t = tl.load(
            k_ptr + offs_d[:, None] * stride_kd + offs_j.to(tl.int64)[None, :] * stride_kn,
            mask=mask_d[:, None] & mask_j[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        logits = tl.dot(q, k_t, input_precision=INPUT_PRECISION) * qk_scale
        # Padded columns could overflow to inf (and inf * 0 is NaN): zero them.
        probs = tl.where(mask_j[None, :], tl.exp2(logits - lse[:, None]), 0.0)
        grad = tl.load(
            grad_ptr
            + offs_i.to(tl.int64)[:, None] * stride_gi
            + offs_j.to(tl.int64)[None, :] * stride_gj,
            mask=mask_i[:, None] & mask_j[None, :],
            other=0.0,
        ).to(tl.float32)
        row_dots += tl.sum(probs * grad, axis=1)
    tl.store(row_dots_ptr + pid_bg * N + offs_i, row_dots, mask=mask_i)


@triton.jit
def _grad_q_kernel(
    grad_ptr,
    q_ptr,
    k_ptr,
    weights_ptr,
    lse_ptr,
    row_dots_ptr,
    grad_q_ptr,
    G,
    N,
    Dh,
    stride_gb,
    stride_gi,
    stride_gj,
    stride_qb,
    stride_qg,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kg,
    stride_kn,
    stride_kd,
    stride_wb,
    stride_wg,
    stride_dqb,
    stride_dqg,
    stride_dqn,
    stride_dqd,
    qk_scale,
    grad_scale,
    DOT_DTYPE: tl.constexpr,
    GRAD_DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dq[b, g, i] = grad_scale * w[b, g] * sum_j P_ij (dOut_ij - D_i) k_j for a block of
    rows of one map (grad_scale = scale / G)."""
    pid_i = tl.program_id(0)
    pid_bg = tl.program_id(1).to(tl.int64)
    pid_b = pid_bg // G
    pid_g = pid_bg % G
    q_ptr += pid_b * stride_qb + pid_g * stride_qg
    k_ptr += pid_b * stride_kb + pid_g * stride_kg
    grad_ptr += pid_b * stride_gb
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < N
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < Dh
    q = tl.load(
        q_ptr + offs_i.to(tl.int64)[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=mask_i[:, None] & mask_d[None, :],
        other=0.0,
    ).to(DOT_DTYPE)
    lse = tl.load(lse_ptr + pid_bg * N + offs_i, mask=mask_i, other=0.0)
    row_dots = tl.load(row_dots_ptr + pid_bg * N + offs_i, mask=mask_i, other=0.0)

    grad_q = tl.zeros((BLOCK_I, BLOCK_D), dtype=tl.float32)
    for j0 in range(0, N, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < N
        k = tl.load(
            k_ptr + offs_j.to(tl.int64)[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            mask=mask_j[:, None] & mask_d[None, :],
            other=0.0,
        )
        logits = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=INPUT_PRECISION)
        probs = tl.where(mask_j[None, :], tl.exp2(logits * qk_scale - lse[:, None]), 0.0)
        grad = tl.load(
            grad_ptr
            + offs_i.to(tl.int64)[:, None] * stride_gi
            + offs_j.to(tl.int64)[None, :] * stride_gj,
            mask=mask_i[:, None] & mask_j[None, :],
            other=0.0,
        ).to(tl.float32)
        grad_logits = probs * (grad - row_dots[:, None])
        grad_q = tl.dot(
            grad_logits.to(GRAD_DOT_DTYPE),
            k.to(GRAD_DOT_DTYPE),
            grad_q,
            input_precision=INPUT_PRECISION,
        )

    weight = tl.load(weights_ptr + pid_b * stride_wb + pid_g * stride_wg).to(tl.float32)
    grad_q *= weight * grad_scale
    tl.store(
        grad_q_ptr
        + pid_b * stride_dqb
        + pid_g * stride_dqg
        + offs_i.to(tl.int64)[:, None] * stride_dqn
        + offs_d[None, :] * stride_dqd,
        grad_q.to(grad_q_ptr.dtype.element_ty),
        mask=mask_i[:, None] & mask_d[None, :],
    )


@triton.jit
def _grad_k_kernel(
    grad_ptr,
    q_ptr,
    k_ptr,
    weights_ptr,
    lse_ptr,
    row_dots_ptr,
    grad_k_ptr,
    G,
    N,
    Dh,
    stride_gb,
    stride_gi,
    stride_gj,
    stride_qb,
    stride_qg,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kg,
    stride_kn,
    stride_kd,
    stride_wb,
    stride_wg,
    stride_dkb,
    stride_dkg,
    stride_dkn,
    stride_dkd,
    qk_scale,
    grad_scale,
    DOT_DTYPE: tl.constexpr,
    GRAD_DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dk[b, g, j] = grad_scale * w[b, g] * sum_i P_ij (dOut_ij - D_i) q_i for a block of
    columns of one map, from transposed (BLOCK_J, BLOCK_I) tiles."""
    pid_j = tl.program_id(0)
    pid_bg = tl.program_id(1).to(tl.int64)
    pid_b = pid_bg // G
    pid_g = pid_bg % G
    q_ptr += pid_b * stride_qb + pid_g * stride_qg
    k_ptr += pid_b * stride_kb + pid_g * stride_kg
    grad_ptr += pid_b * stride_gb
    lse_ptr += pid_bg * N
    row_dots_ptr += pid_bg * N
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_j = offs_j < N
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < Dh
    k = tl.load(
        k_ptr + offs_j.to(tl.int64)[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        mask=mask_j[:, None] & mask_d[None, :],
        other=0.0,
    ).to(DOT_DTYPE)

    grad_k = tl.zeros((BLOCK_J, BLOCK_D), dtype=tl.float32)
    for i0 in range(0, N, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        mask_i = offs_i < N
        q = tl.load(
            q_ptr + offs_i.to(tl.int64)[:, None] * stride_qn + offs_d[None, :] * stride_qd,
            mask=mask_i[:, None] & mask_d[None, :],
            other=0.0,
        )
        lse = tl.load(lse_ptr + offs_i, mask=mask_i, other=0.0)
        row_dots = tl.load(row_dots_ptr + offs_i, mask=mask_i, other=0.0)
        logits_t = tl.dot(k, tl.trans(q.to(DOT_DTYPE)), input_precision=INPUT_PRECISION)
        # Padded rows i (zero queries, lse 0) would give P = 1: zero them.
        probs_t = tl.where(mask_i[None, :], tl.exp2(logits_t * qk_scale - lse[None, :]), 0.0)
        grad_t = tl.load(
            grad_ptr
            + offs_j.to(tl.int64)[:, None] * stride_gj
            + offs_i.to(tl.int64)[None, :] * stride_gi,
            mask=mask_j[:, None] & mask_i[None, :],
            other=0.0,
        ).to(tl.float32)
        grad_logits_t = probs_t * (grad_t - row_dots[None, :])
        grad_k = tl.dot(
            grad_logits_t.to(GRAD_DOT_DTYPE),
            q.to(GRAD_DOT_DTYPE),
            grad_k,
            input_precision=INPUT_PRECISION,
        )

    weight = tl.load(weights_ptr + pid_b * stride_wb + pid_g * stride_wg).to(tl.float32)
    grad_k *= weight * grad_scale
    tl.store(
        grad_k_ptr
        + pid_b * stride_dkb
        + pid_g * stride_dkg
        + offs_j.to(tl.int64)[:, None] * stride_dkn
        + offs_d[None, :] * stride_dkd,
        grad_k.to(grad_k_ptr.dtype.element_ty),
        mask=mask_j[:, None] & mask_d[None, :],
    )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


_DOT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _launch_config(q: torch.Tensor) -> dict:
    """Block sizes and dot dtypes for ``q``.

    Under the interpreter: float32 dots (its bf16 arithmetic is broken) and 16-wide
    blocks, so that the small test shapes still span several row and column blocks;
    64-wide ones from N = 128 on, where the interpreter's per-tile cost dominates.
    """
    block_d = max(16, triton.next_power_of_2(q.shape[-1]))  # tl.dot needs dims >= 16
    if _interpreting() or not q.is_cuda:
        block = 16 if q.shape[2] < 128 else 64
        return {
            "dot_dtype": tl.float32,
            "grad_dot_dtype": tl.float32,
            "input_precision": "ieee",
            "block_i": block,
            "block_j": block,
            "block_d": block_d,
            "num_warps": 1,
            "num_stages": 1,
        }
    dtype = q.dtype
    # float32 follows torch's matmul setting (TF32 off by default, as in the reference);
    # fp16 runs its gradient dots in float32 (see below), where TF32 keeps fp16's mantissa.
    use_tf32 = dtype == torch.float16 or torch.backends.cuda.matmul.allow_tf32
    # Exact float32 dots run on the FMA units and hold their operands in registers:
    # 64-wide tiles spill there (checked with ptxas for sm_90), 32-wide ones do not.
    # Tensor-core tiles of 64 x 64 with 8 warps take 100-210 registers, no spills.
    tensor_cores = dtype != torch.float32 or use_tf32
    block = 64 if tensor_cores else 32
    return {
        "dot_dtype": _DOT_DTYPES[dtype],
        # Gradient tiles P * (dOut - D) can fall below fp16's range, not bf16's.
        "grad_dot_dtype": tl.bfloat16 if dtype == torch.bfloat16 else tl.float32,
        "input_precision": "tf32" if use_tf32 else "ieee",
        "block_i": block,
        "block_j": block,
        "block_d": block_d,
        "num_warps": 8 if tensor_cores else 4,
        "num_stages": 2,
    }


def _launch_options(config: dict) -> dict:
    return {
        "DOT_DTYPE": config["dot_dtype"],
        "INPUT_PRECISION": config["input_precision"],
        "BLOCK_I": config["block_i"],
        "BLOCK_J": config["block_j"],
        "BLOCK_D": config["block_d"],
        "num_warps": config["num_warps"],
        "num_stages": config["num_stages"],
    }


def fuse_attention_maps_forward(
    q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward.

    Args:
        q, k: (B, G, N, Dh) float32/bf16/fp16 (same dtype), any strides, Dh <= MAX_HEAD_DIM.
        weights: (B, G) float32/bf16/fp16, any strides.
        scale: logit scale.

    Returns:
        fused: (B, N, N) contiguous, in q's dtype (accumulated in float32).
        lse: (B, G, N) float32 base-2 log-sum-exp of each row of each map's logits.
    """
    batch, num_maps, num_tokens, head_dim = q.shape
    config = _launch_config(q)
    options = _launch_options(config)
    qk_scale = scale * LOG2_E
    lse = torch.empty((batch, num_maps, num_tokens), dtype=torch.float32, device=q.device)
    _row_stats_kernel[(triton.cdiv(num_tokens, config["block_i"]), batch * num_maps)](
        q,
        k,
        lse,
        num_maps,
        num_tokens,
        head_dim,
        *q.stride(),
        *k.stride(),
        qk_scale,
        **options,
    )
    fused = torch.empty((batch, num_tokens, num_tokens), dtype=q.dtype, device=q.device)
    grid = (
        triton.cdiv(num_tokens, config["block_j"]),
        triton.cdiv(num_tokens, config["block_i"]),
        batch,
    )
    _fuse_maps_kernel[grid](
        q,
        k,
        weights,
        lse,
        fused,
        num_maps,
        num_tokens,
        head_dim,
        *q.stride(),
        *k.stride(),
        *weights.stride(),
        *fused.stride(),
        qk_scale,
        1.0 / num_maps,
        **options,
    )
    return fused, lse


def fuse_attention_maps_row_dots(
    grad_fused: torch.Tensor, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float
) -> torch.Tensor:
    """(B, G, N) float32 D_g,i = sum_j dOut_ij P_g,ij; ``grad_fused`` (B, N, N) any strides."""
    batch, num_maps, num_tokens, head_dim = q.shape
    config = _launch_config(q)
    row_dots = torch.empty((batch, num_maps, num_tokens), dtype=torch.float32, device=q.device)
    _row_dots_kernel[(triton.cdiv(num_tokens, config["block_i"]), batch * num_maps)](
        grad_fused,
        q,
        k,
        lse,
        row_dots,
        num_maps,
        num_tokens,
        head_dim,
        *grad_fused.stride(),
        *q.stride(),
        *k.stride(),
        scale * LOG2_E,
        **_launch_options(config),
    )
    return row_dots


def fuse_attention_maps_backward(
    grad_fused: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    lse: torch.Tensor,
    row_dots: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (B, G, N, Dh) w.r.t. q and k, contiguous, in q's dtype."""
    batch, num_maps, num_tokens, head_dim = q.shape
    config = _launch_config(q)
    options = _launch_options(config)
    grad_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    grad_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    common = (num_maps, num_tokens, head_dim, *grad_fused.stride(), *q.stride(), *k.stride())
    _grad_q_kernel[(triton.cdiv(num_tokens, config["block_i"]), batch * num_maps)](
        grad_fused,
        q,
        k,
        weights,
        lse,
        row_dots,
        grad_q,
        *common,
        *weights.stride(),
        *grad_q.stride(),
        scale * LOG2_E,
        scale / num_maps,
        GRAD_DOT_DTYPE=config["grad_dot_dtype"],
        **options,
    )
    _grad_k_kernel[(triton.cdiv(num_tokens, config["block_j"]), batch * num_maps)](
        grad_fused,
        q,
        k,
        weights,
        lse,
        row_dots,
        grad_k,
        *common,
        *weights.stride(),
        *grad_k.stride(),
        scale * LOG2_E,
        scale / num_maps,
        GRAD_DOT_DTYPE=config["grad_dot_dtype"],
        **options,
    )
    return grad_q, grad_k
