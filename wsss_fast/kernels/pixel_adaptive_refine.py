"""Triton kernels of pixel-adaptive refinement (ToCo's PAR).

Neighbour k of pixel (y, x) is (clamp(y + dy_k, 0, H - 1), clamp(x + dx_k, 0, W - 1)):
the 8 neighbours at each dilation, clamping being what ToCo's replicate padding gives
(also for dilations larger than the image). The offsets come as a (2, K) int32 table
(dy row, dx row) in ToCo's order: dilation by dilation, the 8 neighbours row by row.

- ``_pixel_affinity_kernel``: per (image, block of pixels), the K affinities
  A_k = softmax_k(a) + w_pos * softmax_k(p) of every pixel, computed once and stored as
  (B, K, H, W) float32. The position term softmax_k(p) is the same for every pixel and
  arrives precomputed, already multiplied by w_pos.
- ``_propagate_kernel``: one refinement step out[m, p] = sum_k A_k[p] * in[m, nbr_k(p)]
  per (block of pixels, image), every class in one program: the (K, BLOCK_P)
  affinities and neighbour offsets are loaded and computed once, then each class is a
  gather of K neighbours per pixel and a sum over k. Launched once per iteration on
  the previous step's output (a step needs its neighbours' previous values, up to the
  largest dilation away: no single program can run the iterations of a whole image).
"""

import functools
import os

import torch
import triton
import triton.language as tl

# ToCo's guard of the colour std.
STD_EPS = 1e-8


@triton.jit
def _pixel_affinity_kernel(
    images_ptr,
    offsets_ptr,
    position_ptr,
    affinity_ptr,
    H,
    W,
    K,
    stride_ib,
    stride_ic,
    stride_ih,
    stride_iw,
    w_color,
    std_eps,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """affinity[b, :, p] (float32) for a block of BLOCK_P pixels p = y * W + x of image b.

    Per RGB channel: sigma = unbiased std of the K neighbour values, then
    a_k = -mean_c (|I_k - I_0| / (sigma + eps) / w_color)^2 and A_k = softmax_k(a) +
    position_k, as ToCo's code computes it.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    num_pixels = H * W
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < num_pixels
    y = offs_p // W
    x = offs_p % W
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    dy = tl.load(offsets_ptr + offs_k, mask=mask_k, other=0)
    dx = tl.load(offsets_ptr + K + offs_k, mask=mask_k, other=0)
    ny = tl.minimum(tl.maximum(y[:, None] + dy[None, :], 0), H - 1)
    nx = tl.minimum(tl.maximum(x[:, None] + dx[None, :], 0), W - 1)
    neighbor_offs = ny.to(tl.int64) * stride_ih + nx.to(tl.int64) * stride_iw
    centre_offs = y.to(tl.int64) * stride_ih + x.to(tl.int64) * stride_iw
    mask = mask_p[:, None] & mask_k[None, :]

    color = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    for c in tl.static_range(3):
        channel_ptr = images_ptr + pid_b * stride_ib + c * stride_ic
        neighbors = tl.load(channel_ptr + neighbor_offs, mask=mask, other=0.0).to(tl.float32)
        centre = tl.load(channel_ptr + centre_offs, mask=mask_p, other=0.0).to(tl.float32)
        # Two passes (mean, then squared deviations) as torch.std: no cancellation.
        mean = tl.sum(neighbors, axis=1) / K
        deviation = tl.where(mask, neighbors - mean[:, None], 0.0)
        sigma = tl.sqrt(tl.sum(deviation * deviation, axis=1) / (K - 1))
        ratio = tl.abs(neighbors - centre[:, None]) / (sigma[:, None] + std_eps) / w_color
        color += ratio * ratio
    logits = tl.where(mask_k[None, :], -color / 3.0, float("-inf"))
    logits = logits - tl.max(logits, axis=1)[:, None]
    weights = tl.exp(logits)
    weights = weights / tl.sum(weights, axis=1)[:, None]
    weights += tl.load(position_ptr + offs_k, mask=mask_k, other=0.0)[None, :]

    plane_offs = offs_k.to(tl.int64)[None, :] * num_pixels + offs_p[:, None]
    tl.store(affinity_ptr + pid_b * K * num_pixels + plane_offs, weights, mask=mask)


@triton.jit
def _propagate_kernel(
    source_ptr,
    affinity_ptr,
    offsets_ptr,
    target_ptr,
    M,
    H,
    W,
    K,
    stride_sb,
    stride_sm,
    stride_sh,
    stride_sw,
    stride_tb,
    stride_tm,
    stride_th,
    stride_tw,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """target[b, m, p] = sum_k affinity[b, k, p] * source[b, m, nbr_k(p)] in float32,
    written in the target's dtype, for a block of pixels and every class m."""
    pid_b = tl.program_id(1).to(tl.int64)
    num_pixels = H * W
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < num_pixels
    y = offs_p // W
    x = offs_p % W
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    mask = mask_k[:, None] & mask_p[None, :]
    dy = tl.load(offsets_ptr + offs_k, mask=mask_k, other=0)
    dx = tl.load(offsets_ptr + K + offs_k, mask=mask_k, other=0)
    ny = tl.minimum(tl.maximum(y[None, :] + dy[:, None], 0), H - 1)
    nx = tl.minimum(tl.maximum(x[None, :] + dx[:, None], 0), W - 1)
    neighbor_offs = ny.to(tl.int64) * stride_sh + nx.to(tl.int64) * stride_sw
    plane_offs = offs_k.to(tl.int64)[:, None] * num_pixels + offs_p[None, :]
    affinity = tl.load(affinity_ptr + pid_b * K * num_pixels + plane_offs, mask=mask, other=0.0)

    source_ptr += pid_b * stride_sb
    target_ptrs = (
        target_ptr + pid_b * stride_tb + y.to(tl.int64) * stride_th + x.to(tl.int64) * stride_tw
    )
    for _ in range(M):
        values = tl.load(source_ptr + neighbor_offs, mask=mask, other=0.0)
        refined = tl.sum(values.to(tl.float32) * affinity, axis=0)
        tl.store(target_ptrs, refined.to(target_ptr.dtype.element_ty), mask=mask_p)
        source_ptr += stride_sm
        target_ptrs += stride_tm


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


# Both tables are tiny and fixed per configuration: built and copied to the device once.
@functools.lru_cache(maxsize=32)
def neighbor_offsets(dilations: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(2, K) int32 (dy; dx) of the neighbours, in ToCo's order."""
    unit = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
    offsets = [(dy * d, dx * d) for d in dilations for dy, dx in unit]
    return torch.tensor(offsets, dtype=torch.int32).t().contiguous().to(device)


@functools.lru_cache(maxsize=32)
def position_affinity(
    dilations: tuple[int, ...], w_color: float, w_pos: float, device: torch.device
) -> torch.Tensor:
    """(K,) float32 w_pos * softmax_k(-(d_k / (std(d) + eps) / w_color)^2) (float64 math).

    std is the unbiased std of the K distances and the colour weight divides the
    position term too, as in ToCo's code.
    """
    unit = torch.tensor([2**0.5, 1, 2**0.5, 1, 1, 2**0.5, 1, 2**0.5], dtype=torch.float64)
    distances = torch.cat([unit * d for d in dilations])
    logits = -((distances / (distances.std() + STD_EPS) / w_color) ** 2)
    return (w_pos * logits.softmax(dim=0)).float().to(device)


def _launch_config() -> dict:
    """Pixel block and warps. Under the interpreter one warp (it runs one program at a
    time), and blocks small enough that the small test images span several."""
    if _interpreting():
        return {"block_p": 64, "num_warps": 1}
    # (32 pixels, 64 neighbours) tiles with 4 warps: ~240 registers a thread in the
    # affinity kernel (3 channels of neighbours, offsets, colour terms), ~100 in the
    # propagation kernel, no spills (checked with ptxas for sm_90); 64 pixels spill.
    return {"block_p": 32, "num_warps": 4}


def refine_pixel_adaptive_forward(
    images: torch.Tensor,
    probs: torch.Tensor,
    dilations: list[int],
    iterations: int,
    w_color: float,
    w_pos: float,
) -> torch.Tensor:
    """Fused PAR.

    Args:
        images: (B, 3, H, W) float32/bf16/fp16, any strides.
        probs: (B, M, H, W) float32/bf16/fp16, any strides.
        dilations: positive ints; K = 8 * len(dilations) neighbours.

    Returns:
        (B, M, H, W) contiguous, in the probs' dtype. Intermediate steps stay float32.
    """
    batch, num_classes, height, width = probs.shape
    device = probs.device
    if iterations == 0:
        return probs.clone(memory_format=torch.contiguous_format)
    config = _launch_config()
    num_pixels = height * width
    offsets = neighbor_offsets(tuple(dilations), device)
    num_neighbors = offsets.shape[1]
    position = position_affinity(tuple(dilations), w_color, w_pos, device)
    block_k = triton.next_power_of_2(num_neighbors)

    affinity = torch.empty(
        (batch, num_neighbors, height, width), dtype=torch.float32, device=device
    )
    block_p = config["block_p"]
    _pixel_affinity_kernel[(batch, triton.cdiv(num_pixels, block_p))](
        images,
        offsets,
        position,
        affinity,
        height,
        width,
        num_neighbors,
        *images.stride(),
        w_color,
        STD_EPS,
        BLOCK_P=block_p,
        BLOCK_K=block_k,
        num_warps=config["num_warps"],
    )

    refined = torch.empty((batch, num_classes, height, width), dtype=probs.dtype, device=device)
    scratch = [
        torch.empty((batch, num_classes, height, width), dtype=torch.float32, device=device)
        for _ in range(min(iterations - 1, 2))
    ]
    grid = (triton.cdiv(num_pixels, block_p), batch)
    source = probs
    for step in range(iterations):
        target = refined if step == iterations - 1 else scratch[step % 2]
        _propagate_kernel[grid](
            source,
            affinity,
            offsets,
            target,
            num_classes,
            height,
            width,
            num_neighbors,
            *source.stride(),
            *target.stride(),
            BLOCK_P=block_p,
            BLOCK_K=block_k,
            num_warps=config["num_warps"],
        )
        source = target
    return refined
