"""Adaptive attention fusion: WeakTr's weighted mean of every head's attention map.

With q, k (B, G, N, Dh) the queries and keys of the G = L*H heads of every layer and
weights (B, G),

    fused = (1 / G) sum_g weights_g * softmax(q_g k_g^T * scale)          (B, N, N)

The fused op ``torch.ops.wsss_fast.fuse_attention_maps`` (Triton, see
``wsss_fast.kernels.attention_fusion``) never stores the G maps: it keeps per-row
log-sum-exps (B, G, N) and recomputes the map tiles from q and k, flash-attention
style, in the forward and the backward. Gradients flow to q, k and the weights; when
only the weights need one (WeakTr detaches the maps), the backward is a single pass.
The reference backend materialises the (B, G, N, N) maps as WeakTr's code does.
"""

import math
from numbers import Real

import torch

from wsss_fast.ops._backend import resolve_backend

SUPPORTED_BACKENDS = ("triton", "reference")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.library.custom_op("wsss_fast::fuse_attention_maps", mutates_args=())
def _fuse_attention_maps_op(
    q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (fused (B, N, N) in q's dtype, row log-sum-exps (B, G, N) float32)."""
    from wsss_fast.kernels.attention_fusion import fuse_attention_maps_forward

    return fuse_attention_maps_forward(q, k, weights, scale)


@_fuse_attention_maps_op.register_fake
def _fuse_attention_maps_fake(q, k, weights, scale):
    batch, num_maps, num_tokens, _ = q.shape
    return (
        q.new_empty((batch, num_tokens, num_tokens)),
        q.new_empty((batch, num_maps, num_tokens), dtype=torch.float32),
    )


@torch.library.custom_op("wsss_fast::fuse_attention_maps_row_dots", mutates_args=())
def _fuse_attention_maps_row_dots_op(
    grad_fused: torch.Tensor, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float
) -> torch.Tensor:
    """(B, G, N) float32 sum_j grad_fused[b, i, j] * P_g[i, j]."""
    from wsss_fast.kernels.attention_fusion import fuse_attention_maps_row_dots

    return fuse_attention_maps_row_dots(grad_fused, q, k, lse, scale)


@_fuse_attention_maps_row_dots_op.register_fake
def _fuse_attention_maps_row_dots_fake(grad_fused, q, k, lse, scale):
    return lse.new_empty(lse.shape)


@torch.library.custom_op("wsss_fast::fuse_attention_maps_backward", mutates_args=())
def _fuse_attention_maps_backward_op(
    grad_fused: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    lse: torch.Tensor,
    row_dots: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, G, N, Dh) gradients w.r.t. q and k, in q's dtype."""
    from wsss_fast.kernels.attention_fusion import fuse_attention_maps_backward

    return fuse_attention_maps_backward(grad_fused, q, k, weights, lse, row_dots, scale)


@_fuse_attention_maps_backward_op.register_fake
def _fuse_attention_maps_backward_fake(grad_fused, q, k, weights, lse, row_dots, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _setup_context(ctx, inputs, output):
    q, k, weights, scale = inputs
    _, lse = output
    # A statistic for the backward, not a result: no gradient flows back through it.
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, weights, lse)
    ctx.scale = scale


def _backward(ctx, grad_fused, _grad_lse):
    q, k, weights, lse = ctx.saved_tensors
    row_dots = _fuse_attention_maps_row_dots_op(grad_fused, q, k, lse, ctx.scale)
    grad_q = grad_k = grad_weights = None
    if ctx.needs_input_grad[2]:
        grad_weights = (row_dots.sum(dim=-1) / q.shape[1]).to(weights.dtype)
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        grad_q, grad_k = _fuse_attention_maps_backward_op(
            grad_fused, q, k, weights, lse, row_dots, ctx.scale
        )
    return grad_q, grad_k, grad_weights, None


_fuse_attention_maps_op.register_autograd(_backward, setup_context=_setup_context)


def _tensor_description(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def _check_inputs(q, k, weights, scale) -> None:
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a (B, G, N, Dh) tensor, got {_tensor_description(q)}")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q must be float32, bfloat16 or float16, got {q.dtype}")
    if q.numel() == 0:
        raise ValueError(f"q must not be empty, got shape (B, G, N, Dh) = {tuple(q.shape)}")
    if not isinstance(k, torch.Tensor) or k.shape != q.shape:
        raise ValueError(
            f"k must be a tensor of q's shape {tuple(q.shape)}, got {_tensor_description(k)}"
        )
    if k.dtype != q.dtype:
        raise ValueError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"k is on {k.device} but q on {q.device}")
    if not isinstance(weights, torch.Tensor) or weights.shape != q.shape[:2]:
        raise ValueError(
            f"weights must be a (B, G) = {tuple(q.shape[:2])} tensor, got "
            f"{_tensor_description(weights)}"
        )
    if weights.dtype not in FLOAT_DTYPES:
        raise ValueError(f"weights must be float32, bfloat16 or float16, got {weights.dtype}")
    if weights.device != q.device:
        raise ValueError(f"weights are on {weights.device} but q on {q.device}")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale)
    ):
        raise ValueError(f"scale must be None or a finite number, got {scale!r}")


def fuse_attention_maps(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Weighted mean of the softmax attention maps of G heads, without storing the maps.

    Args:
        q: (B, G, N, Dh) float32, bfloat16 or float16 queries of the G = L*H heads of
            every layer, any strides; Dh <= 256 for the triton backend.
        k: (B, G, N, Dh) keys, q's dtype.
        weights: (B, G) float32, bfloat16 or float16 per-map weights.
        scale: logit scale (default Dh^-0.5, the ViT's).
        backend: ``triton``, ``reference`` or ``auto`` (default: ``WSSS_FAST_BACKEND``,
            else auto: Triton on CUDA tensors, the reference on CPU tensors).

    Returns:
        (B, N, N) in q's dtype (under autocast: autocast's dtype, q and k are cast to it
        as for a matmul), accumulated in float32 by the fused op; differentiable with
        respect to q, k and weights.
    """
    _check_inputs(q, k, weights, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    chosen = resolve_backend("fuse_attention_maps", q.device, SUPPORTED_BACKENDS, backend)
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        # A custom op is opaque to autocast; cast as autocast casts the reference's matmul.
        autocast_dtype = torch.get_autocast_dtype(device_type)
        q, k = q.to(autocast_dtype), k.to(autocast_dtype)
    if chosen == "reference":
        from wsss_fast.reference.attention_fusion import fuse_attention_maps as reference

        return reference(q, k, weights, scale=scale).to(q.dtype)
    from wsss_fast.kernels.attention_fusion import MAX_HEAD_DIM

    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(
            f"q head dimensions above {MAX_HEAD_DIM} are not supported by the triton backend, "
            f"got Dh = {q.shape[-1]}; use backend='reference'"
        )
    fused, _ = _fuse_attention_maps_op(q, k, weights, scale)
    return fused
