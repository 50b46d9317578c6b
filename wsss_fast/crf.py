"""A drop-in for pydensecrf: ``import wsss_fast.crf as dcrf``.

Same class names, methods, constants and helpers as ``pydensecrf.densecrf`` and
``pydensecrf.utils``, with the same numbers, computed by the compiled op
``wsss_fast::dense_crf_inference``. Arrays go in and come out as numpy, shapes as in
pydensecrf: unary (M, N), marginals (M, N), pixel n = y*W + x.

Differences, all on the safe side: float64/float16 or non-contiguous inputs are
converted instead of rejected; wrong shapes, non-finite values and non-positive
standard deviations raise a ValueError naming the argument. ``device`` runs the
inference on a CUDA device when the extension has CUDA kernels.

Memory: on the CPU, buffers of a megabyte and more (marginals, lattices) come from a
pool that keeps up to 256 MiB of released buffers (the oldest go first) for later
calls, so a run over a dataset does not pay the page faults of fresh memory for every
image.
"""

from collections.abc import Sequence
from numbers import Number

import numpy as np
import torch

from wsss_fast.ops.dense_crf import (
    NO_NORMALIZATION,
    NORMALIZATIONS,
    NORMALIZE_AFTER,
    NORMALIZE_BEFORE,
    NORMALIZE_SYMMETRIC,
    bilateral_features,
    dense_crf_inference,
    pixel_grid_features,
    strip_grid_width,
)

CONST_KERNEL = 0
DIAG_KERNEL = 1
FULL_KERNEL = 2
KERNEL_TYPES = (CONST_KERNEL, DIAG_KERNEL, FULL_KERNEL)

__all__ = [
    "CONST_KERNEL",
    "DIAG_KERNEL",
    "FULL_KERNEL",
    "NORMALIZE_AFTER",
    "NORMALIZE_BEFORE",
    "NORMALIZE_SYMMETRIC",
    "NO_NORMALIZATION",
    "DenseCRF",
    "DenseCRF2D",
    "create_pairwise_bilateral",
    "create_pairwise_gaussian",
    "unary_from_labels",
    "unary_from_softmax",
]


def _float32_matrix(name: str, value, shape: tuple[int, ...]) -> np.ndarray:
    """Converts to a C-contiguous float32 array of ``shape`` or raises a ValueError."""
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be a numeric array, got dtype {array.dtype}")
    if array.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {array.shape}")
    # A copy, as pydensecrf makes: later changes to the caller's array change nothing.
    if array.dtype == np.float32 and array.flags.c_contiguous:
        # Copied and checked in one pass, into pooled memory (no page faults): a
        # 21-label 500x375 unary took 1.2-1.3 ms, not 1.8-2.0 (np.array, aminmax).
        return torch.ops.wsss_fast.finite_copy(torch.from_numpy(array), name).numpy()
    array = np.array(array, dtype=np.float32, order="C", copy=True)
    # The extremes, in one pass without a temporary (a NaN anywhere makes both NaN):
    # half the time of np.isfinite(array).all() on a 21-label 500x375 unary.
    if array.size and not torch.stack(torch.aminmax(torch.from_numpy(array))).isfinite().all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _positive(name: str, value, count: int) -> tuple[float, ...]:
    """A number or a sequence of ``count`` numbers, each > 0."""
    if isinstance(value, Number):
        values = (value,) * count
    elif isinstance(value, Sequence | np.ndarray):
        values = tuple(np.asarray(value).reshape(-1).tolist())
    else:
        raise ValueError(f"{name} must be a number or {count} numbers, got {value!r}")
    if len(values) != count:
        raise ValueError(f"{name} must be a number or {count} numbers, got {value!r}")
    for item in values:
        if isinstance(item, bool) or not isinstance(item, Number):
            raise ValueError(f"{name} must be positive and finite, got {value!r}")
        if not np.isfinite(item) or item <= 0:
            raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return tuple(float(item) for item in values)


class DenseCRF:
    """Dense CRF over ``nvar`` variables with ``nlabels`` labels and arbitrary features."""

    def __init__(self, nvar: int, nlabels: int, *, device: str | torch.device = "cpu"):
        if not isinstance(nvar, int) or nvar < 1:
            raise ValueError(f"nvar must be a positive int, got {nvar!r}")
        if not isinstance(nlabels, int) or nlabels < 1:
            raise ValueError(f"nlabels must be a positive int, got {nlabels!r}")
        self._nvar = nvar
        self._nlabels = nlabels
        self._device = torch.device(device)
        self._unary: torch.Tensor | None = None
        self._features: list[torch.Tensor] = []
        self._compat: list[torch.Tensor] = []
        self._normalization: list[int] = []

    def setUnaryEnergy(self, u, f=None) -> None:
        """Sets the unary energies, float (nlabels, nvar)."""
        if f is not None:
            raise ValueError("setUnaryEnergy: logistic unaries (argument f) are not supported")
        unary = _float32_matrix("unary", u, (self._nlabels, self._nvar))
        self._unary = torch.from_numpy(unary).to(self._device).unsqueeze(0)

    def addPairwiseEnergy(
        self, features, compat, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC
    ) -> None:
        """Adds a Gaussian kernel over float (d, nvar) features (already scaled)."""
        array = np.asarray(features)
        if array.ndim != 2 or array.shape[1] != self._nvar:
            raise ValueError(f"features must have shape (d, {self._nvar}), got {array.shape}")
        array = _float32_matrix("features", array, array.shape)
        self._add_kernel(torch.from_numpy(array), compat, kernel, normalization)

    def _add_kernel(self, features: torch.Tensor, compat, kernel, normalization) -> None:
        if kernel not in KERNEL_TYPES:
            raise ValueError(f"kernel must be one of {KERNEL_TYPES}, got {kernel!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}"
            )
        if not 1 <= features.shape[0] <= 16:
            raise ValueError(f"features must have 1 to 16 dimensions, got {features.shape[0]}")
        self._compat.append(self._compat_tensor(compat))
        self._features.append(features.to(self._device).unsqueeze(0))
        self._normalization.append(int(normalization))

    def _compat_tensor(self, compat) -> torch.Tensor:
        labels = self._nlabels
        if isinstance(compat, Number):
            if not np.isfinite(compat):
                raise ValueError(f"compat must be finite, got {compat!r}")
            return torch.tensor(float(compat), dtype=torch.float32, device=self._device)
        array = np.asarray(compat)
        if array.ndim == 1:
            array = _float32_matrix("compat", array, (labels,))
        elif array.ndim == 2:
            array = _float32_matrix("compat", array, (labels, labels))
        else:
            raise ValueError(
                f"compat must be a number, a ({labels},) vector or a ({labels}, {labels}) "
                f"matrix, got shape {array.shape}"
            )
        return torch.from_numpy(array).to(self._device)

    def _run(self, iterations: int, init_q: torch.Tensor | None) -> np.ndarray:
        if self._unary is None:
            raise ValueError("setUnaryEnergy must be called before inference")
        if not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"n_iterations must be a non-negative int, got {iterations!r}")
        q = dense_crf_inference(
            self._unary,
            self._features,
            self._compat,
            self._normalization,
            iterations,
            init_q,
            grid_width=self._grid_width(),
        )
        return q[0].cpu().numpy()

    def _grid_width(self) -> int:
        """The op's grid_width: 0, the variables are no image's pixels."""
        return 0

    def inference(self, n_iterations: int) -> np.ndarray:
        """Runs ``n_iterations`` mean-field steps; returns float32 (nlabels, nvar) marginals."""
        return self._run(n_iterations, None)

    def startInference(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns (Q, tmp1, tmp2) with Q = softmax(-unary), for ``stepInference``."""
        q = self._run(0, None)
        return q, np.empty_like(q), np.empty_like(q)

    def stepInference(self, Q: np.ndarray, tmp1=None, tmp2=None) -> None:
        """One mean-field step, updating ``Q`` (float32 (nlabels, nvar)) in place."""
        if not isinstance(Q, np.ndarray) or Q.dtype != np.float32 or not Q.flags.writeable:
            raise ValueError("Q must be the writeable float32 array returned by startInference")
        start = _float32_matrix("Q", Q, (self._nlabels, self._nvar))
        init_q = torch.from_numpy(start).to(self._device).unsqueeze(0)
        Q[...] = self._run(1, init_q)


class DenseCRF2D(DenseCRF):
    """Dense CRF over a ``w`` x ``h`` image with ``nlabels`` labels (width first)."""

    def __init__(self, w: int, h: int, nlabels: int, *, device: str | torch.device = "cpu"):
        if not isinstance(w, int) or w < 1 or not isinstance(h, int) or h < 1:
            raise ValueError(f"w and h must be positive ints, got w={w!r}, h={h!r}")
        super().__init__(w * h, nlabels, device=device)
        self._width = w
        self._height = h
        self._spatial_sigmas: list[float] = []  # of the kernels added with sxy

    def _grid_width(self) -> int:
        # Kernels from addPairwiseEnergy have features of unknown scale.
        known = len(self._spatial_sigmas) // 2 == len(self._features)
        return strip_grid_width(self._width, self._spatial_sigmas if known else None)

    def _grid(self, sxy: tuple[float, float]) -> torch.Tensor:
        return pixel_grid_features(self._height, self._width, sxy, "cpu")

    def addPairwiseGaussian(
        self, sxy, compat, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC
    ) -> None:
        """Smoothness kernel on the position features (x / sx, y / sy)."""
        spatial = _positive("sxy", sxy, 2)
        self._add_kernel(self._grid(spatial), compat, kernel, normalization)
        self._spatial_sigmas.extend(spatial)

    def addPairwiseBilateral(
        self, sxy, srgb, rgbim, compat, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC
    ) -> None:
        """Appearance kernel on (x / sx, y / sy, r / sr, g / sg, b / sb); rgbim uint8 (H, W, 3)."""
        image = np.asarray(rgbim)
        expected = (self._height, self._width, 3)
        if image.shape != expected:
            hint = " (channels first? pass (H, W, 3))" if image.shape[:1] == (3,) else ""
            raise ValueError(
                f"rgbim must have shape (H, W, 3) = {expected}, got {image.shape}{hint}"
            )
        if image.dtype != np.uint8:
            if image.dtype.kind not in "iuf" or image.min() < 0 or image.max() > 255:
                raise ValueError(f"rgbim must be uint8 in [0, 255], got dtype {image.dtype}")
            if image.dtype.kind == "f" and not np.array_equal(image, np.round(image)):
                raise ValueError("rgbim must hold whole numbers in [0, 255] (uint8 RGB)")
            image = image.astype(np.uint8)
        chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0)
        spatial = _positive("sxy", sxy, 2)
        features = bilateral_features(chw, spatial, _positive("srgb", srgb, 3))
        self._add_kernel(features[0], compat, kernel, normalization)
        self._spatial_sigmas.extend(spatial)


def unary_from_softmax(sm, scale: float | None = None, clip: float | None = 1e-5) -> np.ndarray:
    """-log of softmax probabilities sm (M, ...) as float32 (M, N), as pydensecrf.utils."""
    sm = np.asarray(sm)
    if sm.ndim < 2:
        raise ValueError(f"sm must have shape (M, ...) with M labels, got {sm.shape}")
    labels = sm.shape[0]
    if scale is not None:
        if not 0 < scale <= 1:
            raise ValueError(f"scale must be in (0, 1], got {scale!r}")
        sm = scale * sm + (1 - scale) * np.ones(sm.shape) / labels
    if clip is not None:
        sm = np.clip(sm, clip, 1.0)
    return -np.log(sm).reshape([labels, -1]).astype(np.float32)


def unary_from_labels(labels, n_labels: int, gt_prob: float, zero_unsure: bool = True):
    """Unary energies (n_labels, N) float32 from a label map, as pydensecrf.utils.

    The given label gets -log(gt_prob), every other -log((1 - gt_prob) / (n_labels - 1)).
    With ``zero_unsure`` label 0 means "unsure" (uniform) and the others shift down by one.
    """
    if not 0 < gt_prob < 1:
        raise ValueError(f"gt_prob must be in (0, 1), got {gt_prob!r}")
    if not isinstance(n_labels, int) or n_labels < 2:
        raise ValueError(f"n_labels must be an int >= 2, got {n_labels!r}")
    flat = np.asarray(labels).reshape(-1)
    if flat.dtype.kind not in "iu":
        raise ValueError(f"labels must be an integer array, got dtype {flat.dtype}")
    index = flat - 1 if zero_unsure else flat
    valid = (flat == 0) if zero_unsure else np.zeros(flat.shape, bool)
    bad = ~valid & ((index < 0) | (index >= n_labels))
    if bad.any():
        upper = n_labels if zero_unsure else n_labels - 1
        raise ValueError(
            f"labels must lie in [0, {upper}], got {flat[bad].min()}..{flat[bad].max()}"
        )
    other_energy = -np.log((1.0 - gt_prob) / (n_labels - 1))
    label_energy = -np.log(gt_prob)
    unary = np.full((n_labels, flat.size), other_energy, dtype=np.float32)
    known = ~valid
    unary[index[known], np.flatnonzero(known)] = label_energy
    if zero_unsure:
        unary[:, valid] = -np.log(1.0 / n_labels)
    return unary


def create_pairwise_gaussian(sdims: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """Position features (len(shape), prod(shape)) float32: coordinate i / sdims[i]."""
    mesh = np.array(np.meshgrid(*[range(size) for size in shape], indexing="ij"), dtype=np.float32)
    for axis, scale in enumerate(_positive("sdims", sdims, len(shape))):
        mesh[axis] /= scale
    return mesh.reshape([len(shape), -1])


def create_pairwise_bilateral(sdims, schan, img, chdim: int = -1) -> np.ndarray:
    """Position and channel features of ``img``, float32 (dims + channels, N)."""
    img = np.asarray(img)
    channels = img[np.newaxis] if chdim == -1 else np.moveaxis(img, chdim, 0)
    channels = channels.astype(np.float32)
    scales = _positive("schan", schan, channels.shape[0])
    for channel, scale in enumerate(scales):
        channels[channel] /= scale
    spatial = channels.shape[1:]
    mesh = np.array(
        np.meshgrid(*[range(size) for size in spatial], indexing="ij"), dtype=np.float32
    )
    for axis, scale in enumerate(_positive("sdims", sdims, len(spatial))):
        mesh[axis] /= scale
    features = np.concatenate([mesh, channels])
    return features.reshape([features.shape[0], -1])
