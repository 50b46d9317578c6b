"""Dense CRF (fully-connected CRF with Gaussian pair potentials), batched.

``dense_crf`` refines softmax probabilities with the mean-field inference of
Kraehenbuehl & Koltun (2011), giving pydensecrf's numbers. The work happens in the
compiled op ``torch.ops.wsss_fast.dense_crf_inference`` (C++ on CPU tensors, CUDA on
GPU tensors); ``wsss_fast.crf`` is the pydensecrf-compatible face of the same op.
"""

from collections.abc import Sequence
from numbers import Integral, Real

import torch

import wsss_fast  # noqa: F401  (loads wsss_fast._C, which defines the op)
from wsss_fast.ops._backend import resolve_backend

NO_NORMALIZATION = 0
NORMALIZE_BEFORE = 1
NORMALIZE_AFTER = 2
NORMALIZE_SYMMETRIC = 3
NORMALIZATIONS = (NO_NORMALIZATION, NORMALIZE_BEFORE, NORMALIZE_AFTER, NORMALIZE_SYMMETRIC)

# Probabilities are clipped here before -log, as pydensecrf's unary_from_softmax does.
PROBABILITY_CLIP = 1e-5

# Below this spatial standard deviation (pixels) a kernel's lattice has about a vertex
# per pixel, and the CPU's strip order (``grid_width``) slows its blur down: DeepLab's
# Gaussian at sxy = 1 took the 500x375 op from 540 to 581 ms (one thread); at sxy = 3
# the strips make it faster (see ``strip_grid_width``).
STRIP_ORDER_MIN_SXY = 2.0


def strip_grid_width(width: int, spatial_sigmas: Sequence[float] | None) -> int:
    """``grid_width`` for the pixels of an image ``width`` wide, given every pairwise
    kernel's spatial standard deviations (None: a kernel's are unknown): the width when
    all are at least ``STRIP_ORDER_MIN_SXY``, else 0 (raster order)."""
    if spatial_sigmas is None or any(sxy < STRIP_ORDER_MIN_SXY for sxy in spatial_sigmas):
        return 0
    return width


@torch.library.register_fake("wsss_fast::dense_crf_inference")
def _dense_crf_inference_fake(
    unary, features, compat, normalization, iterations, init_q=None, grid_width=0
):
    return torch.empty_like(unary, dtype=torch.float32)


@torch.library.register_fake("wsss_fast::finite_copy")
def _finite_copy_fake(values, name):
    return torch.empty_like(values)


def dense_crf_inference(
    unary: torch.Tensor,
    features: Sequence[torch.Tensor],
    compat: Sequence[torch.Tensor],
    normalization: Sequence[int],
    iterations: int,
    init_q: torch.Tensor | None = None,
    *,
    grid_width: int = 0,
    backend: str | None = None,
) -> torch.Tensor:
    """Mean-field inference of a dense CRF given its energies and kernel features.

    Args:
        unary: (B, M, N) float32 unary energies (-log probabilities).
        features: per pairwise kernel, (B, d_k, N) float32 features already divided by
            the kernel's standard deviations. A batch stride of 0 (``expand``) shares one
            lattice across the batch.
        compat: per kernel, float32: a 0-d tensor (Potts weight w: adds w * filtered),
            (M,) (diagonal) or (M, M) (matrix, symmetrised) compatibility.
        normalization: per kernel, one of ``NORMALIZATIONS``.
        iterations: number of mean-field steps (>= 0).
        init_q: optional (B, M, N) marginals to start from instead of softmax(-unary).
        grid_width: when the N points are the pixels of an image in raster order, its
            width (0: points in any order). The CPU then visits them in vertical strips,
            which keeps the lattice rows in cache (faster, same result up to float
            rounding: the splats add up in another order).
        backend: ``compiled`` or ``reference`` (default: ``WSSS_FAST_BACKEND``, else auto).

    Returns:
        (B, M, N) float32 marginals on the device of ``unary``.
    """
    chosen = resolve_backend("dense_crf", unary.device, ("compiled", "reference"), backend)
    if chosen == "reference":
        from wsss_fast.reference.dense_crf import dense_crf_inference as reference

        # The reference has one visiting order; the argument is checked as the op does.
        points = unary.shape[-1] if isinstance(unary, torch.Tensor) and unary.dim() else 0
        valid = isinstance(grid_width, Integral) and not isinstance(grid_width, bool)
        if not valid or grid_width < 0 or (grid_width and points % grid_width):
            raise ValueError(
                "grid_width must be 0 (points in any order) or an image width dividing "
                f"N = {points}, got {grid_width!r}"
            )
        return reference(unary, features, compat, normalization, iterations, init_q)
    return torch.ops.wsss_fast.dense_crf_inference(
        unary, list(features), list(compat), list(normalization), iterations, init_q, grid_width
    )


def _check_pair(name: str, value, length: int) -> tuple[float, ...]:
    if not isinstance(value, Sequence) or len(value) != length:
        raise ValueError(f"{name} must be a tuple of {length} numbers, got {value!r}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, Real) or not item > 0:
            raise ValueError(f"{name} entries must be positive numbers, got {value!r}")
    return tuple(float(item) for item in value)


def pixel_grid_features(height: int, width: int, sxy: tuple[float, float], device) -> torch.Tensor:
    """(2, H*W) float32 features (x / sx, y / sy) of the pixel grid, pixel n = y*W + x."""
    features = torch.empty(2, height, width, dtype=torch.float32, device=device)
    _write_grid_features(features, sxy)
    return features.view(2, height * width)


def _write_grid_features(out: torch.Tensor, sxy: tuple[float, float]) -> None:
    """Fills float32 (2, H, W) ``out`` with x / sx and y / sy: one division per column
    and per row, then broadcast copies (the same float32 quotients as per pixel)."""
    _, height, width = out.shape
    out[0] = torch.arange(width, dtype=torch.float32, device=out.device) / sxy[0]
    out[1] = (torch.arange(height, dtype=torch.float32, device=out.device) / sxy[1]).view(-1, 1)


def bilateral_features(
    images: torch.Tensor, sxy: tuple[float, float], srgb: tuple[float, float, float]
) -> torch.Tensor:
    """(B, 5, H*W) float32 features (x/sx, y/sy, r/sr, g/sg, b/sb) of uint8 (B, 3, H, W) images."""
    batch, _, height, width = images.shape
    features = torch.empty(batch, 5, height, width, dtype=torch.float32, device=images.device)
    _write_grid_features(features[0, :2], sxy)
    features[1:, :2] = features[0, :2]
    colour_scale = torch.tensor(srgb, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    torch.div(images, colour_scale, out=features[:, 2:])
    return features.view(batch, 5, height * width)


def dense_crf(
    images: torch.Tensor,
    probs: torch.Tensor,
    *,
    gaussian: tuple[float, float] | None = (3, 3),
    bilateral: tuple[float, float, float] | None = (80, 13, 10),
    iterations: int = 10,
    backend: str | None = None,
) -> torch.Tensor:
    """Refines probabilities with a dense CRF, batched, on the device of the inputs.

    Args:
        images: (B, 3, H, W) uint8 RGB images.
        probs: (B, M, H, W) float softmax probabilities (any float dtype; computed in
            float32). The unary is -log(clip(probs, 1e-5, 1)).
        gaussian: (sxy, compat) of the Gaussian (smoothness) kernel, or None.
        bilateral: (sxy, srgb, compat) of the bilateral (appearance) kernel, or None.
        iterations: mean-field steps.
        backend: ``compiled`` or ``reference`` (see ``wsss_fast.ops._backend``).

    Returns:
        (B, M, H, W) float32 refined probabilities.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) uint8 tensor, got {got}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 RGB in [0, 255], got dtype {images.dtype}")
    if not isinstance(probs, torch.Tensor) or probs.dim() != 4 or not probs.is_floating_point():
        got = (
            (tuple(probs.shape), probs.dtype)
            if isinstance(probs, torch.Tensor)
            else type(probs).__name__
        )
        raise ValueError(f"probs must be a float (B, M, H, W) tensor, got {got}")
    batch, labels, height, width = probs.shape
    if images.shape[0] != batch or images.shape[2:] != probs.shape[2:]:
        raise ValueError(
            f"images (B, 3, H, W) = {tuple(images.shape)} do not match probs (B, M, H, W) = "
            f"{tuple(probs.shape)}: B, H and W must agree"
        )
    if images.device != probs.device:
        raise ValueError(f"images are on {images.device} but probs on {probs.device}")
    if labels < 1:
        raise ValueError(f"probs must have at least one label channel, got shape {probs.shape}")
    if isinstance(iterations, bool) or not isinstance(iterations, Integral) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative int, got {iterations!r}")
    iterations = int(iterations)

    device = probs.device
    features, compat, spatial_sigmas = [], [], []
    if gaussian is not None:
        sxy, weight = _check_pair("gaussian", gaussian, 2)
        spatial_sigmas.append(sxy)
        grid = pixel_grid_features(height, width, (sxy, sxy), device)
        features.append(grid.unsqueeze(0).expand(batch, -1, -1))
        compat.append(torch.tensor(weight, dtype=torch.float32, device=device))
    if bilateral is not None:
        sxy, srgb, weight = _check_pair("bilateral", bilateral, 3)
        spatial_sigmas.append(sxy)
        features.append(bilateral_features(images, (sxy, sxy), (srgb, srgb, srgb)))
        compat.append(torch.tensor(weight, dtype=torch.float32, device=device))

    flat = probs.detach().reshape(batch, labels, height * width).to(torch.float32)
    if not torch.isfinite(flat).all():
        raise ValueError("probs contain NaN or infinite values")
    unary = -torch.log(flat.clamp(PROBABILITY_CLIP, 1.0))
    q = dense_crf_inference(
        unary,
        features,
        compat,
        [NORMALIZE_SYMMETRIC] * len(features),
        iterations,
        grid_width=strip_grid_width(width, spatial_sigmas),
        backend=backend,
    )
    return q.view(batch, labels, height, width)
