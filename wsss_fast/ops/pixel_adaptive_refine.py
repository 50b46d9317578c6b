"""Pixel-adaptive refinement (PAR): ToCo's refinement of CAMs by local image affinity.

Each pixel has K = 8 * len(dilations) neighbours, the 8 surrounding pixels at each
dilation, with replicate padding (coordinates clamped to the image, so a dilation
larger than the image is fine). With I the image:

- colour: a_k = -mean_RGB (|I_k - I_0| / (sigma + 1e-8) / w_color)^2, sigma the
  unbiased std of the K neighbour values of the pixel in that channel;
- position: p_k = -(d_k / (std(d) + 1e-8) / w_color)^2, d_k = dilation * sqrt(2) for
  diagonal and dilation for axial neighbours, std(d) the unbiased std of the K
  distances. ToCo's code divides this term by the colour weight w_color too (there is
  no separate position scale); this op does the same;
- A_k = softmax_k(a) + w_pos * softmax_k(p), which sums to 1 + w_pos (not renormalised,
  as in ToCo);
- ``iterations`` steps of M <- sum_k A_k * M(neighbour k).

The fused op ``torch.ops.wsss_fast.refine_pixel_adaptive`` (Triton, see
``wsss_fast.kernels.pixel_adaptive_refine``) computes the (B, K, H, W) affinities once
and runs one gather-and-weight kernel per iteration over all images and classes. The
reference backend follows ToCo's code: pad + dilated conv per dilation, concatenation,
a loop over the images. The ``torch`` backend (the CPU default) is the same
arithmetic batched over images: neighbours are slices of one replicate-padded map per
dilation (no convolution), and each iteration is a sum of K weighted slices.

No gradient: PAR makes pseudo-labels. ``refine_pixel_adaptive`` detaches its inputs
on every backend, so its result never requires grad. The raw op has no autograd
formula: called on inputs that require grad, its result raises on ``backward()``.
"""

import math
from collections.abc import Sequence
from numbers import Integral, Real

import torch
import torch.nn.functional as F

from wsss_fast.ops._backend import resolve_backend

SUPPORTED_BACKENDS = ("triton", "torch", "reference")
# Neighbour offsets (row, column) in units of the dilation, in the reference's order.
_NEIGHBOR_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
_STD_EPS = 1e-8
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.library.custom_op("wsss_fast::refine_pixel_adaptive", mutates_args=())
def _refine_pixel_adaptive_op(
    images: torch.Tensor,
    probs: torch.Tensor,
    dilations: list[int],
    iterations: int,
    w_color: float,
    w_pos: float,
) -> torch.Tensor:
    """(B, M, H, W) refined maps in the probs' dtype (contiguous)."""
    from wsss_fast.kernels.pixel_adaptive_refine import refine_pixel_adaptive_forward

    return refine_pixel_adaptive_forward(images, probs, dilations, iterations, w_color, w_pos)


@_refine_pixel_adaptive_op.register_fake
def _refine_pixel_adaptive_fake(images, probs, dilations, iterations, w_color, w_pos):
    return probs.new_empty(probs.shape)


def _neighbor_slices(maps: torch.Tensor, dilations: Sequence[int]):
    """Yields the K neighbour maps of (B, C, H, W) ``maps``, each (B, C, H, W), as
    views of a replicate-padded copy per dilation (offsets as ``_NEIGHBOR_OFFSETS``)."""
    height, width = maps.shape[-2:]
    for dilation in dilations:
        padded = F.pad(maps, [dilation] * 4, mode="replicate")
        for row, column in _NEIGHBOR_OFFSETS:
            top, left = dilation * (1 + row), dilation * (1 + column)
            yield padded[..., top : top + height, left : left + width]


def _refine_pixel_adaptive_torch(images, probs, dilations, iterations, w_color, w_pos):
    """The ``torch`` backend: (B, M, H, W) in the probs' dtype, computed in float32."""
    images = images.float()
    masks = probs.float()
    neighbors = torch.stack(list(_neighbor_slices(images, dilations)), dim=2)  # (B, 3, K, H, W)
    color_std = neighbors.std(dim=2, keepdim=True)
    color = -(((neighbors - images[:, :, None]).abs() / (color_std + _STD_EPS) / w_color) ** 2)
    unit = torch.tensor([2**0.5 if row and column else 1.0 for row, column in _NEIGHBOR_OFFSETS])
    distances = torch.cat([unit * dilation for dilation in dilations]).to(images.device)
    position = -((distances / (distances.std() + _STD_EPS) / w_color) ** 2)
    affinity = color.mean(dim=1).softmax(dim=1) + w_pos * position.softmax(dim=0)[:, None, None]
    affinity = affinity[:, None]  # (B, 1, K, H, W): the same weights for every map
    for _ in range(iterations):
        refined = torch.zeros_like(masks)
        for index, neighbor in enumerate(_neighbor_slices(masks, dilations)):
            refined.addcmul_(affinity[:, :, index], neighbor)
        masks = refined
    return masks.to(probs.dtype).contiguous()


def _tensor_description(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def _check_inputs(images, probs, dilations, iterations, w_color, w_pos, check_range) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {_tensor_description(images)}")
    if images.dtype not in FLOAT_DTYPES:
        raise ValueError(f"images must be float32, bfloat16 or float16, got {images.dtype}")
    if images.numel() == 0:
        raise ValueError(f"images must not be empty, got shape {tuple(images.shape)}")
    if not isinstance(probs, torch.Tensor) or probs.dim() != 4:
        raise ValueError(f"probs must be a (B, M, H, W) tensor, got {_tensor_description(probs)}")
    if probs.dtype not in FLOAT_DTYPES:
        raise ValueError(f"probs must be float32, bfloat16 or float16, got {probs.dtype}")
    if probs.shape[1] == 0:
        raise ValueError(f"probs must have M >= 1 maps, got shape {tuple(probs.shape)}")
    if probs.shape[0] != images.shape[0] or probs.shape[2:] != images.shape[2:]:
        raise ValueError(
            f"probs (B, M, H, W) = {tuple(probs.shape)} do not match images (B, 3, H, W) = "
            f"{tuple(images.shape)}: resize the maps to the images first"
        )
    if probs.device != images.device:
        raise ValueError(f"probs are on {probs.device} but images on {images.device}")
    if isinstance(dilations, (str, bytes)) or not isinstance(dilations, Sequence):
        raise ValueError(f"dilations must be a sequence of positive ints, got {dilations!r}")
    if len(dilations) == 0:
        raise ValueError("dilations must not be empty")
    for dilation in dilations:
        if isinstance(dilation, bool) or not isinstance(dilation, Integral) or dilation < 1:
            raise ValueError(f"dilations must be positive ints, got {dilations!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, Integral) or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
    if isinstance(w_color, bool) or not isinstance(w_color, Real) or not w_color > 0:
        raise ValueError(f"w_color must be a positive number, got {w_color!r}")
    if not math.isfinite(w_color):
        raise ValueError(f"w_color must be finite, got {w_color!r}")
    if isinstance(w_pos, bool) or not isinstance(w_pos, Real) or not math.isfinite(w_pos):
        raise ValueError(f"w_pos must be a finite number >= 0, got {w_pos!r}")
    if w_pos < 0:
        raise ValueError(f"w_pos must be >= 0, got {w_pos!r}")
    if not isinstance(check_range, bool):
        raise ValueError(f"check_range must be a bool, got {check_range!r}")
    # Synchronises with the device, hence only on request. NaN fails it too.
    if check_range and not bool(((images >= 0) & (images <= 1)).all()):
        raise ValueError("images must lie in [0, 1] (de-normalise them first)")


def refine_pixel_adaptive(
    images: torch.Tensor,
    probs: torch.Tensor,
    *,
    dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
    iterations: int = 10,
    w_color: float = 0.3,
    w_pos: float = 0.01,
    check_range: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Refines class maps with the local colour affinity of the image (ToCo's PAR).

    Args:
        images: (B, 3, H, W) float32, bfloat16 or float16 RGB images in [0, 1], any
            strides (channels-last included).
        probs: (B, M, H, W) float32, bfloat16 or float16 maps (softmax probabilities)
            at the images' resolution, any strides.
        dilations: the neighbour rings; K = 8 * len(dilations) neighbours, replicate
            padding (a dilation may exceed the image).
        iterations: refinement steps (0 returns a copy of ``probs``).
        w_color: colour (and, as in ToCo, position) affinity temperature.
        w_pos: weight of the position affinity.
        check_range: raise if ``images`` leave [0, 1] (synchronises with the device).
        backend: ``triton``, ``torch``, ``reference`` or ``auto`` (default:
            ``WSSS_FAST_BACKEND``, else auto: Triton on CUDA tensors, ``torch`` on CPU).

    Returns:
        (B, M, H, W) in the probs' dtype (computed in float32), contiguous. Never
        requires grad: the inputs are detached (PAR makes pseudo-labels).
    """
    _check_inputs(images, probs, dilations, iterations, w_color, w_pos, check_range)
    images, probs = images.detach(), probs.detach()
    dilations = [int(dilation) for dilation in dilations]
    chosen = resolve_backend("refine_pixel_adaptive", probs.device, SUPPORTED_BACKENDS, backend)
    if chosen == "torch":
        return _refine_pixel_adaptive_torch(
            images, probs, dilations, int(iterations), float(w_color), float(w_pos)
        )
    if chosen == "reference":
        from wsss_fast.reference.pixel_adaptive_refine import refine_pixel_adaptive as reference

        return reference(
            images,
            probs,
            dilations=dilations,
            iterations=int(iterations),
            w_color=float(w_color),
            w_pos=float(w_pos),
        )
    return _refine_pixel_adaptive_op(
        images, probs, dilations, int(iterations), float(w_color), float(w_pos)
    )
