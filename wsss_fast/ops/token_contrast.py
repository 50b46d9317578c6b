"""Token-similarity contrast loss: ToCo's patch token contrast (PTC), APC's patch contrast.

Tokens are L2-normalised; s_ij is their cosine (its absolute value when ``absolute``).
Over the pairs i != j of one image whose labels are both valid, a pair is positive when
the labels are equal and negative otherwise, and

    L = 0.5 * (1 - sum_pos s / (n_pos + 1)) + 0.5 * sum_neg max(s - margin, 0) / (n_neg + 1)

with sums and counts pooled over the batch. ``absolute=True, margin=0`` is ToCo's PTC,
``absolute=False`` with a margin APC's PCL.

The fused op ``torch.ops.wsss_fast.token_contrast_loss`` (Triton, see
``wsss_fast.kernels.token_contrast``) never holds the N x N similarity: extra memory is
O(B * N) and the (B, N, D) gradient. The reference backend builds the (B, N, N)
similarity and relation tensors as ToCo's code does.
"""

import math
from numbers import Integral, Real

import torch

from wsss_fast.ops._backend import resolve_backend

SUPPORTED_BACKENDS = ("triton", "reference")
TOKEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


@torch.library.custom_op("wsss_fast::token_contrast_loss", mutates_args=())
def _token_contrast_loss_op(
    tokens: torch.Tensor, labels: torch.Tensor, ignore_index: int, absolute: bool, margin: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, token norms (B, N) float32, pair weights (2,) float32)."""
    from wsss_fast.kernels.token_contrast import token_contrast_forward

    return token_contrast_forward(tokens, labels, ignore_index, absolute, margin)


@_token_contrast_loss_op.register_fake
def _token_contrast_loss_fake(tokens, labels, ignore_index, absolute, margin):
    batch, num_tokens, _ = tokens.shape
    return (
        tokens.new_empty(()),
        tokens.new_empty((batch, num_tokens), dtype=torch.float32),
        tokens.new_empty((2,), dtype=torch.float32),
    )


@torch.library.custom_op("wsss_fast::token_contrast_loss_backward", mutates_args=())
def _token_contrast_loss_backward_op(
    grad_loss: torch.Tensor,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    norms: torch.Tensor,
    pair_weights: torch.Tensor,
    ignore_index: int,
    absolute: bool,
    margin: float,
) -> torch.Tensor:
    """(B, N, D) gradient w.r.t. the tokens, in their dtype."""
    from wsss_fast.kernels.token_contrast import token_contrast_backward

    return token_contrast_backward(
        grad_loss, tokens, labels, norms, pair_weights, ignore_index, absolute, margin
    )


@_token_contrast_loss_backward_op.register_fake
def _token_contrast_loss_backward_fake(
    grad_loss, tokens, labels, norms, pair_weights, ignore_index, absolute, margin
):
    return tokens.new_empty(tokens.shape)


def _setup_context(ctx, inputs, output):
    tokens, labels, ignore_index, absolute, margin = inputs
    _, norms, pair_weights = output
    # Statistics for the backward, not results: no gradient flows back through them.
    ctx.mark_non_differentiable(norms, pair_weights)
    ctx.save_for_backward(tokens, labels, norms, pair_weights)
    ctx.options = (ignore_index, absolute, margin)


def _backward(ctx, grad_loss, _grad_norms, _grad_pair_weights):
    tokens, labels, norms, pair_weights = ctx.saved_tensors
    grad_tokens = None
    if ctx.needs_input_grad[0]:
        grad_tokens = _token_contrast_loss_backward_op(
            grad_loss, tokens, labels, norms, pair_weights, *ctx.options
        )
    return grad_tokens, None, None, None, None


_token_contrast_loss_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(tokens, labels, ignore_index, absolute, margin) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
        got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be a (B, N, D) tensor, got {got}")
    if tokens.dtype not in TOKEN_DTYPES:
        raise ValueError(f"tokens must be float32, bfloat16 or float16, got {tokens.dtype}")
    if tokens.numel() == 0:
        raise ValueError(f"tokens must not be empty, got shape (B, N, D) = {tuple(tokens.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a (B, N) tensor, got {got}")
    if labels.dtype not in LABEL_DTYPES:
        raise ValueError(f"labels must be an integer tensor (int64), got {labels.dtype}")
    if labels.shape != tokens.shape[:2]:
        raise ValueError(
            f"labels (B, N) = {tuple(labels.shape)} do not match tokens (B, N, D) = "
            f"{tuple(tokens.shape)}"
        )
    if labels.device != tokens.device:
        raise ValueError(f"labels are on {labels.device} but tokens on {tokens.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, Integral):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if not isinstance(absolute, bool):
        raise ValueError(f"absolute must be a bool, got {absolute!r}")
    if isinstance(margin, bool) or not isinstance(margin, Real) or not math.isfinite(margin):
        raise ValueError(f"margin must be a finite number, got {margin!r}")


def token_contrast_loss(
    tokens: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = 255,
    absolute: bool = True,
    margin: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Contrast loss over the pairwise cosine similarities of the tokens of each image.

    Args:
        tokens: (B, N, D) float32, bfloat16 or float16 tokens, any strides.
        labels: (B, N) integer (int64) token labels; ``ignore_index`` marks ignored tokens.
        ignore_index: label of the tokens that take part in no pair.
        absolute: use |cos| (ToCo) rather than cos (APC).
        margin: negatives count only above it: max(s - margin, 0).
        backend: ``triton``, ``reference`` or ``auto`` (default: ``WSSS_FAST_BACKEND``,
            else auto: Triton on CUDA tensors, the reference on CPU tensors).

    Returns:
        0-d tensor in the tokens' dtype (under autocast: autocast's dtype, the tokens are
        cast to it as for a matmul); the fused op computes in float32. A batch without
        any valid pair gives 0.5 and an all-zero gradient.
    """
    _check_inputs(tokens, labels, ignore_index, absolute, margin)
    chosen = resolve_backend("token_contrast_loss", tokens.device, SUPPORTED_BACKENDS, backend)
    if chosen == "reference":
        from wsss_fast.reference.token_contrast import token_contrast_loss as reference

        return reference(
            tokens, labels, ignore_index=int(ignore_index), absolute=absolute, margin=margin
        )
    device_type = tokens.device.type
    if torch.is_autocast_enabled(device_type):
        # A custom op is opaque to autocast; cast as autocast casts the reference's matmul.
        tokens = tokens.to(torch.get_autocast_dtype(device_type))
    loss, _, _ = _token_contrast_loss_op(tokens, labels, int(ignore_index), absolute, float(margin))
    return loss
