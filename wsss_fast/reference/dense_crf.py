"""Dense CRF reference in numpy: the algorithm of shared/design/crf.md, step by step.

Mean-field inference of the fully-connected CRF of Kraehenbuehl & Koltun (2011), with
message passing by permutohedral-lattice filtering (Adams et al. 2010). Every step is
vectorised over pixels and follows pydensecrf's float32 arithmetic and operation order,
so that the marginals agree with pydensecrf2 to about 1e-6. Clarity over speed: this is
the ground truth for tests, never the fast path.

Layout: values are (N, C) float32, one row per point (pixel), as pydensecrf stores
its (C, N) column-major matrices.
"""

from collections.abc import Sequence

import numpy as np
import torch

NO_NORMALIZATION = 0
NORMALIZE_BEFORE = 1
NORMALIZE_AFTER = 2
NORMALIZE_SYMMETRIC = 3
NORMALIZATIONS = (NO_NORMALIZATION, NORMALIZE_BEFORE, NORMALIZE_AFTER, NORMALIZE_SYMMETRIC)

# pydensecrf's SSE build embeds points four at a time and pads the last block with
# points at the origin; their lattice vertices exist (they take part in the blur as
# neighbours) although nothing is splatted onto them.
_EMBED_BLOCK = 4

_F32 = np.float32


def _lattice_scale(d: int) -> np.ndarray:
    """(d,) float32 per-axis scale of the elevation: sqrt(2/3) (d+1) / sqrt((i+1)(i+2))."""
    inv_std_dev = float(_F32(np.sqrt(2.0 / 3.0) * (d + 1)))
    return np.array([1.0 / np.sqrt((i + 2) * (i + 1)) * inv_std_dev for i in range(d)], dtype=_F32)


def _embed(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Enclosing simplex of each point.

    Args:
        features: (d, P) float32 point coordinates.

    Returns:
        keys (P, d+1, d) int64: the first d coordinates of the d+1 enclosing vertices;
        weights (P, d+1) float32: their barycentric weights.
    """
    d, count = features.shape
    scale = _lattice_scale(d)
    down = _F32(1.0) / _F32(d + 1)
    up = _F32(d + 1)

    # Elevate onto the hyperplane sum(E) = 0.
    elevated = np.empty((d + 1, count), dtype=_F32)
    running = np.zeros(count, dtype=_F32)
    for j in range(d, 0, -1):
        cf = features[j - 1] * scale[j - 1]
        elevated[j] = running - _F32(j) * cf
        running = running + cf
    elevated[0] = running

    # Nearest remainder-0 point; np.rint rounds half to even like the SSE conversion.
    rounded = np.rint(down * elevated)
    rem0 = rounded * up
    shift = rounded.sum(axis=0).astype(np.int64)

    # Rank of each residual in the sorted order (ties go to the later coordinate).
    residual = elevated - rem0
    rank = np.zeros((d + 1, count), dtype=np.int64)
    for i in range(d):
        for j in range(i + 1, d + 1):
            less = residual[i] < residual[j]
            rank[i] += less
            rank[j] += ~less

    # Bring points whose rounded coordinates do not sum to 0 back onto the plane.
    rank += shift
    below, above = rank < 0, rank > d
    rank[below] += d + 1
    rem0[below] += up
    rank[above] -= d + 1
    rem0[above] -= up

    # Barycentric weights, accumulated in coordinate order as pydensecrf does.
    barycentric = np.zeros((d + 2, count), dtype=_F32)
    points = np.arange(count)
    for i in range(d + 1):
        v = (elevated[i] - rem0[i]) * down
        barycentric[d - rank[i], points] += v
        barycentric[d - rank[i] + 1, points] -= v
    barycentric[0] += _F32(1.0) + barycentric[d + 1]

    # Vertex r of the simplex: rem0 + r where rank <= d - r, else rem0 + r - (d + 1).
    rem0_int = rem0.astype(np.int64)
    keys = np.empty((count, d + 1, d), dtype=np.int64)
    for r in range(d + 1):
        step = np.where(rank[:d] <= d - r, r, r - (d + 1))
        keys[:, r, :] = (rem0_int[:d] + step).T
    return keys, np.ascontiguousarray(barycentric[: d + 1].T)


def _opaque_rows(rows: np.ndarray) -> np.ndarray:
    """(K, d) int64 keys as (K,) opaque items, so that np.unique and np.searchsorted
    compare whole keys at once (in byte order, which is all a hash table needs)."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    return rows.view(np.dtype((np.void, rows.itemsize * rows.shape[1]))).reshape(-1)


class PermutohedralLattice:
    """Permutohedral lattice over the points of one image; filters values with it.

    Args:
        features: (d, N) float32 features, already divided by the standard deviations.
    """

    def __init__(self, features: np.ndarray):
        features = np.ascontiguousarray(features, dtype=_F32)
        d, count = features.shape
        self.dim = d
        self.num_points = count

        padded = -count % _EMBED_BLOCK
        if padded:
            features = np.concatenate([features, np.zeros((d, padded), dtype=_F32)], axis=1)
        keys, weights = _embed(features)

        # Deduplicate the vertices; `offsets` indexes them, +1 because row 0 of every
        # value buffer stands for a missing vertex (value 0).
        table, inverse = np.unique(_opaque_rows(keys.reshape(-1, d)), return_inverse=True)
        vertices = table.view(np.int64).reshape(-1, d)
        self.num_vertices = len(vertices)
        self.offsets = inverse.reshape(-1, d + 1)[:count] + 1  # (N, d+1)
        self.weights = weights[:count]  # (N, d+1) float32

        # Blur neighbours along each of the d+1 lattice axes: key - 1 with key[j] + d,
        # and key + 1 with key[j] - d (for axis d only the +-1 part touches the key).
        self.neighbours = np.zeros((d + 1, 2, self.num_vertices), dtype=np.int64)
        for axis in range(d + 1):
            for side, sign in enumerate((-1, 1)):
                wanted = vertices + sign
                if axis < d:
                    wanted[:, axis] -= sign * (d + 1)
                wanted = _opaque_rows(wanted)
                found = np.minimum(np.searchsorted(table, wanted), self.num_vertices - 1)
                exists = table[found] == wanted
                self.neighbours[axis, side] = np.where(exists, found + 1, 0)

    def filter(self, values: np.ndarray, sequential: bool) -> np.ndarray:
        """Splat, blur, slice: an approximate Gaussian filter of (N, C) float32 values.

        ``sequential`` follows pydensecrf's scalar path (used for C <= 2): blur sums
        in double and slices as (w * v) * alpha; otherwise its SSE path: float blur and
        (w * alpha) * v.
        """
        d, count = self.dim, self.num_points
        values = np.asarray(values, dtype=_F32)
        channels = values.shape[1]

        # Splat, pixel after pixel (np.add.at adds in index order, like pydensecrf).
        lattice = np.zeros((self.num_vertices + 1, channels), dtype=_F32)
        contributions = self.weights[:, :, None] * values[:, None, :]
        np.add.at(lattice, self.offsets.reshape(-1), contributions.reshape(-1, channels))

        # Blur along each axis; a pass reads only the previous buffer.
        for axis in range(d + 1):
            n1, n2 = self.neighbours[axis]
            pair = lattice[n1] + lattice[n2]
            blurred = np.zeros_like(lattice)
            if sequential:
                blurred[1:] = lattice[1:].astype(np.float64) + 0.5 * pair.astype(np.float64)
            else:
                blurred[1:] = lattice[1:] + _F32(0.5) * pair
            lattice = blurred

        # Slice: sum over the enclosing vertices, scaled by alpha = 1 / (1 + 2^-d).
        alpha = _F32(1.0) / (_F32(1.0) + _F32(2.0**-d))
        out = np.zeros((count, channels), dtype=_F32)
        for r in range(d + 1):
            vertex_values = lattice[self.offsets[:, r]]
            weight = self.weights[:, r, None]
            if sequential:
                out += (weight * vertex_values) * alpha
            else:
                out += (weight * alpha) * vertex_values
        return out


class GaussianKernel:
    """One pairwise kernel: a lattice and the normalisation of its filter.

    Args:
        features: (d, N) float32 features.
        normalization: pydensecrf's NormalizationType (0..3).
    """

    def __init__(self, features: np.ndarray, normalization: int):
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be 0..3, got {normalization!r}")
        self.lattice = PermutohedralLattice(features)
        self.normalization = normalization
        ones = np.ones((self.lattice.num_points, 1), dtype=_F32)
        norm = self.lattice.filter(ones, sequential=True)[:, 0].astype(np.float64)
        # pydensecrf computes these in double and stores them as float.
        if normalization == NORMALIZE_SYMMETRIC:
            self.scale = (1.0 / np.sqrt(norm + 1e-20)).astype(_F32)
        else:
            self.scale = (1.0 / (norm + 1e-20)).astype(_F32)

    def apply(self, q: np.ndarray) -> np.ndarray:
        """Filtered marginals (N, M) float32 of q (N, M) float32."""
        sequential = q.shape[1] <= 2
        if self.normalization in (NORMALIZE_SYMMETRIC, NORMALIZE_BEFORE):
            q = q * self.scale[:, None]
        out = self.lattice.filter(q, sequential)
        if self.normalization in (NORMALIZE_SYMMETRIC, NORMALIZE_AFTER):
            out = out * self.scale[:, None]
        return out


def _compatibility(compat: np.ndarray, filtered: np.ndarray) -> np.ndarray:
    """The pairwise message (N, M) float32 that is subtracted from -unary.

    compat: 0-d Potts weight w (message -w * filtered), (M,) diagonal v
    (v * filtered) or (M, M) matrix m (filtered @ (0.5 (m + m^T))^T).
    """
    if compat.ndim == 0:
        return -compat * filtered
    if compat.ndim == 1:
        return compat[None, :] * filtered
    symmetric = _F32(0.5) * (compat + compat.T)
    return filtered @ symmetric.T


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, M) float32, max subtracted."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _to_numpy(name: str, tensor, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A float32 tensor (of ``shape`` if given) as a numpy array, else a ValueError."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {tensor.dtype}")
    if shape is not None and tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    array = tensor.detach().cpu().numpy()
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def dense_crf_inference(
    unary: torch.Tensor,
    features: Sequence[torch.Tensor],
    compat: Sequence[torch.Tensor],
    normalization: Sequence[int],
    iterations: int,
    init_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean-field inference of a dense CRF, numpy reference of the compiled op.

    Args:
        unary: (B, M, N) float32 unary energies.
        features: per kernel, (B, d_k, N) float32 features (divided by the std devs).
        compat: per kernel, float32 0-d (Potts weight w: T += w * filtered), (M,)
            (diagonal v: T -= v * filtered) or (M, M) (T -= 0.5 (m + m^T) filtered).
        normalization: per kernel, 0 none, 1 before, 2 after, 3 symmetric.
        iterations: mean-field steps, >= 0.
        init_q: optional (B, M, N) marginals to start from instead of softmax(-unary).

    Returns:
        (B, M, N) float32 marginals on the device of ``unary``.
    """
    if not isinstance(unary, torch.Tensor) or unary.dim() != 3:
        got = tuple(unary.shape) if isinstance(unary, torch.Tensor) else type(unary).__name__
        raise ValueError(f"unary must be a (B, M, N) tensor, got {got}")
    batch, labels, count = unary.shape
    if not len(features) == len(compat) == len(normalization):
        raise ValueError(
            f"features, compat and normalization must have one entry per kernel, got "
            f"{len(features)}, {len(compat)} and {len(normalization)}"
        )
    if not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative int, got {iterations!r}")
    for k, mode in enumerate(normalization):
        if mode not in NORMALIZATIONS:
            raise ValueError(f"normalization[{k}] must be one of {NORMALIZATIONS}, got {mode!r}")
    energies = _to_numpy("unary", unary)
    feature_arrays = []
    for k, feature in enumerate(features):
        if not isinstance(feature, torch.Tensor) or feature.dim() != 3:
            raise ValueError(f"features[{k}] must be a (B, d, N) tensor")
        shape = (batch, feature.shape[1], count)
        feature_arrays.append(_to_numpy(f"features[{k}]", feature, shape))
    compat_arrays = []
    for k, weights in enumerate(compat):
        array = _to_numpy(f"compat[{k}]", weights)
        if array.shape not in ((), (labels,), (labels, labels)):
            raise ValueError(
                f"compat[{k}] must have shape (), ({labels},) or ({labels}, {labels}), "
                f"got {array.shape}"
            )
        compat_arrays.append(array)
    start = None if init_q is None else _to_numpy("init_q", init_q, (batch, labels, count))

    result = np.empty((batch, labels, count), dtype=_F32)
    for b in range(batch):
        minus_unary = -np.ascontiguousarray(energies[b].T)  # (N, M)
        q = _softmax(minus_unary) if start is None else np.ascontiguousarray(start[b].T)
        if iterations > 0:
            kernels = [
                GaussianKernel(feature[b], int(mode))
                for feature, mode in zip(feature_arrays, normalization, strict=True)
            ]
            for _ in range(iterations):
                logits = minus_unary
                for kernel, weights in zip(kernels, compat_arrays, strict=True):
                    logits = logits - _compatibility(weights, kernel.apply(q))
                q = _softmax(logits)
        result[b] = q.T
    return torch.from_numpy(result).to(unary.device)
