"""Dense CRF inputs shared by the tests and the benchmarks.

Real photographs (tests/data/photos, 500x375), synthetic but realistic softmax maps for
them, the parameter sets WSSS code bases use (shared/design/crf.md), and one helper that
runs any module with pydensecrf's ``DenseCRF2D`` API (pydensecrf2 itself or the drop-in
``wsss_fast.crf``) on them. Nothing here imports wsss_fast or pydensecrf at module level.
"""

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

PHOTO_DIR = Path(__file__).parent / "data" / "photos"
PHOTOS = ("coffee", "chelsea", "astronaut", "rocket")
PHOTO_WIDTH, PHOTO_HEIGHT = 500, 375

# Probabilities are clipped here before -log, as pydensecrf.utils.unary_from_softmax does.
PROBABILITY_CLIP = 1e-5
NORMALIZE_SYMMETRIC = 3  # pydensecrf's default normalisation


def load_photo(name: str) -> np.ndarray:
    """The photograph ``name`` (one of PHOTOS) as uint8 RGB (H, W, 3), C-contiguous."""
    path = PHOTO_DIR / f"{name}.jpg"
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"no photo {name!r} at {path}")
    return np.ascontiguousarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))


def synthetic_softmax(
    image: np.ndarray,
    num_labels: int,
    seed: int = 0,
    *,
    segments: int = 10,
    temperature: float = 1.0,
) -> np.ndarray:
    """Realistic softmax probabilities (M, H, W) float32 for an RGB image.

    A classifier's output in miniature: the image is cut coarsely into ``segments``
    regions by colour and position, each region gets a label, and the label scores are
    blurred across region borders and disturbed by smooth and pixel noise, so the
    softmax is peaked but not one-hot and wrong near edges: the CRF changes labels.
    Deterministic for a seed.

    Args:
        image: uint8 (H, W, 3) RGB.
        num_labels: M >= 1.
        seed: seed of every random choice.
        segments: number of colour/position regions.
        temperature: softmax temperature (lower: more peaked).
    """
    rng = np.random.default_rng(seed)
    height, width = image.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    colour = image.reshape(-1, 3).astype(np.float32) / 40.0
    position = np.stack([ys.ravel(), xs.ravel()], axis=1) / (0.3 * max(height, width))
    points = np.concatenate([colour, position], axis=1)

    # Nearest of `segments` random centres in (colour, position) space.
    centres = points[rng.choice(len(points), size=segments, replace=False)]
    distance = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
    region = distance.argmin(axis=1).reshape(height, width)
    region_label = rng.integers(0, num_labels, size=segments)
    label_map = region_label[region]

    # Blurred one-hot scores: soft, and wrong near region borders.
    scores = np.zeros((height, width, num_labels), dtype=np.float32)
    scores[ys.astype(int), xs.astype(int), label_map] = 1.0
    sigma = 0.02 * max(height, width)
    scores = np.stack([cv2.GaussianBlur(scores[..., m], (0, 0), sigma) for m in range(num_labels)])

    # Smooth noise (regions of wrong labels) and pixel noise.
    coarse = rng.normal(size=(num_labels, max(height // 24, 2), max(width // 24, 2)))
    smooth = np.stack(
        [
            cv2.resize(layer.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
            for layer in coarse
        ]
    )
    pixel = rng.normal(size=(num_labels, height, width)).astype(np.float32)
    logits = 5.0 * scores + 1.0 * smooth + 0.5 * pixel

    logits = logits / temperature
    logits -= logits.max(axis=0, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=0, keepdims=True)
    return probs.astype(np.float32)


def unary_from_softmax(probs: np.ndarray) -> np.ndarray:
    """-log(clip(probs, 1e-5, 1)) as float32 (M, N): pydensecrf.utils' formula."""
    labels = probs.shape[0]
    clipped = np.clip(probs, PROBABILITY_CLIP, 1.0)
    return np.ascontiguousarray(-np.log(clipped).reshape(labels, -1).astype(np.float32))


def unary_from_labels(label_map: np.ndarray, num_labels: int, gt_prob: float) -> np.ndarray:
    """Energies float32 (M, N) of a hard label map: pydensecrf.utils' formula with
    zero_unsure=False (the given label -log(gt_prob), the others share the rest)."""
    flat = label_map.reshape(-1)
    unary = np.full(
        (num_labels, flat.size), -np.log((1.0 - gt_prob) / (num_labels - 1)), dtype=np.float32
    )
    unary[flat, np.arange(flat.size)] = -np.log(gt_prob)
    return unary


@dataclass(frozen=True)
class CrfParameters:
    """One dense CRF configuration: Gaussian (sxy, compat) and bilateral
    (sxy, srgb, compat) kernels, and how the code base builds its unary.

    ``unary`` is ``"softmax"`` (unary_from_softmax of the probabilities) or
    ``"labels"`` (unary_from_labels of their argmax with ``gt_prob``, zero_unsure=False).
    """

    name: str
    gaussian_sxy: float
    gaussian_compat: float
    bilateral_sxy: float
    bilateral_srgb: float
    bilateral_compat: float
    unary: str = "softmax"
    gt_prob: float = 0.7
    iterations: int = 10

    def make_unary(self, probs: np.ndarray) -> np.ndarray:
        """Unary energies float32 (M, N) from probabilities (M, H, W), as the code base does."""
        if self.unary == "labels":
            return unary_from_labels(probs.argmax(axis=0), probs.shape[0], self.gt_prob)
        return unary_from_softmax(probs)


PARAMETER_SETS: dict[str, CrfParameters] = {
    params.name: params
    for params in (
        CrfParameters("psa_softmax", 3, 3, 80, 13, 10),
        CrfParameters("irn_labels", 3, 3, 50, 5, 10, unary="labels", gt_prob=0.7),
        CrfParameters("deeplab", 1, 3, 67, 3, 4),
        CrfParameters("toco_final", 1, 1, 121, 5, 4),
        CrfParameters("toco_cam", 3, 3, 36, 3, 4),
        CrfParameters("weaktr", 3, 3, 83, 5, 3),
        CrfParameters("mctformer", 4, 3, 83, 5, 3),
    )
}


def densecrf2d(dcrf, image, unary, gaussian, bilateral, normalization=NORMALIZE_SYMMETRIC):
    """A DenseCRF2D of ``dcrf`` (``pydensecrf.densecrf`` or ``wsss_fast.crf``), set up.

    image uint8 (H, W, 3), unary float32 (M, H*W); gaussian (sxy, compat) and bilateral
    (sxy, srgb, compat), each or None.
    """
    height, width = image.shape[:2]
    crf = dcrf.DenseCRF2D(width, height, unary.shape[0])
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    if gaussian is not None:
        crf.addPairwiseGaussian(sxy=gaussian[0], compat=gaussian[1], normalization=normalization)
    if bilateral is not None:
        crf.addPairwiseBilateral(
            sxy=bilateral[0],
            srgb=bilateral[1],
            rgbim=np.ascontiguousarray(image),
            compat=bilateral[2],
            normalization=normalization,
        )
    return crf


def run_densecrf2d(
    dcrf, image: np.ndarray, unary: np.ndarray, params: CrfParameters, iterations=None
) -> np.ndarray:
    """Marginals float32 (M, N) for a parameter set, from a module with pydensecrf's API."""
    gaussian = (params.gaussian_sxy, params.gaussian_compat)
    bilateral = (params.bilateral_sxy, params.bilateral_srgb, params.bilateral_compat)
    crf = densecrf2d(dcrf, image, unary, gaussian, bilateral)
    steps = params.iterations if iterations is None else iterations
    return np.asarray(crf.inference(steps), dtype=np.float32)


def grid_features(height: int, width: int, sxy: float) -> np.ndarray:
    """(2, H*W) float32 Gaussian features (x / sxy, y / sxy), pixel n = y*W + x."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    scale = np.float32(sxy)
    return np.stack([xs.ravel() / scale, ys.ravel() / scale])


def bilateral_features(image: np.ndarray, sxy: float, srgb: float) -> np.ndarray:
    """(5, H*W) float32 bilateral features (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb)."""
    height, width = image.shape[:2]
    colour = image.reshape(-1, 3).T.astype(np.float32) / np.float32(srgb)
    return np.concatenate([grid_features(height, width, sxy), colour])


def marginal_differences(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    """(max abs difference, fraction of pixels with the same argmax) of (M, N) marginals."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    if ours.shape != theirs.shape:
        raise ValueError(f"shapes differ: {ours.shape} vs {theirs.shape}")
    max_abs = float(np.abs(ours.astype(np.float64) - theirs).max())
    agreement = float((ours.argmax(axis=0) == theirs.argmax(axis=0)).mean())
    return max_abs, agreement


def opcheck_arguments(device) -> list[tuple[tuple, dict]]:
    """Argument sets of wsss_fast::dense_crf_inference for torch.library.opcheck.

    Small (B=2, M=3, N=35) inputs on ``device`` covering shared (expanded) and own
    features, Potts / diagonal / matrix compatibilities, every normalisation,
    init_q, no kernel and zero iterations; and (B=1, M=3, N=2*130) points of a
    130-pixel-wide image, visited in strips (grid_width).
    """
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.rand(*shape, generator=generator)

    unary = (rand(2, 3, 35) * 3).to(device)
    gaussian = (rand(1, 2, 35) * 4).to(device).expand(2, -1, -1)
    bilateral = (rand(2, 5, 35) * 4).to(device)
    potts = torch.tensor(3.0, device=device)
    diagonal = (-rand(3) * 3).to(device)
    matrix = (-rand(3, 3) * 3).to(device)
    init_q = torch.softmax(torch.randn(2, 3, 35, generator=generator), dim=1).to(device)
    grid_unary = (rand(1, 3, 260) * 3).to(device)
    grid_bilateral = (rand(1, 5, 260) * 4).to(device)
    return [
        ((unary, [gaussian, bilateral], [potts, potts], [3, 3], 2), {}),
        ((unary, [gaussian, bilateral], [diagonal, matrix], [0, 1], 1), {}),
        ((unary, [bilateral], [potts], [2], 3), {"init_q": init_q}),
        ((unary[:, :1], [], [], [], 2), {}),
        ((unary, [gaussian], [potts], [3], 0), {}),
        ((grid_unary, [grid_bilateral], [potts], [3], 2), {"grid_width": 130}),
    ]
