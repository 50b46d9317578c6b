"""The numpy dense CRF reference (wsss_fast.reference.dense_crf) against pydensecrf2.

pydensecrf2 is the independent ground truth here: same inputs, marginals within 1e-4
(in practice ~1e-6) and the same argmax. Real photographs at full size and as crops,
every parameter set of crf.md, every normalisation mode, Potts / diagonal / matrix
compatibilities, the M <= 2 code path of pydensecrf and 81 labels.
"""

import numpy as np
import pytest
import torch

from tests.crf_inputs import (
    PARAMETER_SETS,
    PHOTOS,
    bilateral_features,
    densecrf2d,
    grid_features,
    load_photo,
    marginal_differences,
    run_densecrf2d,
    synthetic_softmax,
    unary_from_softmax,
)
from wsss_fast.reference import dense_crf as reference

dcrf = pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 is not installed")

MAX_ABS_DIFF = 1e-4
MIN_ARGMAX_AGREEMENT = 0.9999


def crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre crop, C-contiguous."""
    top = (image.shape[0] - height) // 2
    left = (image.shape[1] - width) // 2
    return np.ascontiguousarray(image[top : top + height, left : left + width])


def compat_tensor(compat) -> torch.Tensor:
    """pydensecrf's compat argument (number, (M,) or (M, M)) as the op's float32 tensor."""
    return torch.as_tensor(np.asarray(compat, dtype=np.float32))


def reference_2d(
    image, unary, gaussian, bilateral, iterations, normalization=dcrf.NORMALIZE_SYMMETRIC
):
    """Reference marginals (M, N) for a DenseCRF2D set-up; gaussian (sxy, compat),
    bilateral (sxy, srgb, compat), either may be None."""
    height, width = image.shape[:2]
    features, compat = [], []
    if gaussian is not None:
        features.append(grid_features(height, width, gaussian[0]))
        compat.append(compat_tensor(gaussian[1]))
    if bilateral is not None:
        features.append(bilateral_features(image, bilateral[0], bilateral[1]))
        compat.append(compat_tensor(bilateral[2]))
    q = reference.dense_crf_inference(
        torch.from_numpy(unary)[None],
        [torch.from_numpy(f)[None] for f in features],
        compat,
        [int(normalization)] * len(features),
        iterations,
    )
    return q[0].numpy()


def pydensecrf_2d(
    image, unary, gaussian, bilateral, iterations, normalization=dcrf.NORMALIZE_SYMMETRIC
):
    """pydensecrf2's marginals (M, N) for the same set-up as reference_2d."""
    crf = densecrf2d(dcrf, image, unary, gaussian, bilateral, normalization)
    return np.asarray(crf.inference(iterations))


def assert_marginals_match(ours: np.ndarray, theirs: np.ndarray, unary=None) -> None:
    assert ours.dtype == np.float32
    diff, agreement = marginal_differences(ours, theirs)
    assert diff <= MAX_ABS_DIFF, f"max abs difference {diff:.3g}"
    assert agreement >= MIN_ARGMAX_AGREEMENT, f"argmax agreement {agreement:.6f}"
    assert np.allclose(ours.sum(axis=0), 1.0, atol=1e-5)
    if unary is not None and unary.shape[0] > 1:
        # The inputs must be such that the CRF matters, or the comparison proves little.
        changed = float((theirs.argmax(axis=0) != unary.argmin(axis=0)).mean())
        assert changed > 0.01, f"the CRF changed only {changed:.2%} of the labels"


def photo_case(photo: str, height: int, width: int, labels: int, seed: int):
    image = crop(load_photo(photo), height, width)
    unary = unary_from_softmax(synthetic_softmax(image, labels, seed=seed))
    return image, unary


def test_full_size_photo_matches_pydensecrf():
    """500x375, 21 labels, PSA parameters, 10 iterations: the issue's criterion."""
    params = PARAMETER_SETS["psa_softmax"]
    image = load_photo("coffee")
    unary = params.make_unary(synthetic_softmax(image, 21, seed=0))
    gaussian = (params.gaussian_sxy, params.gaussian_compat)
    bilateral = (params.bilateral_sxy, params.bilateral_srgb, params.bilateral_compat)
    ours = reference_2d(image, unary, gaussian, bilateral, params.iterations)
    assert_marginals_match(ours, run_densecrf2d(dcrf, image, unary, params), unary)


@pytest.mark.parametrize("name", sorted(PARAMETER_SETS))
def test_parameter_sets_match_pydensecrf(name):
    """Every parameter set of crf.md with its unary kind, on a 200x150 crop, 21 labels."""
    params = PARAMETER_SETS[name]
    index = sorted(PARAMETER_SETS).index(name)
    image = crop(load_photo(PHOTOS[index % len(PHOTOS)]), 150, 200)
    unary = params.make_unary(synthetic_softmax(image, 21, seed=index))
    gaussian = (params.gaussian_sxy, params.gaussian_compat)
    bilateral = (params.bilateral_sxy, params.bilateral_srgb, params.bilateral_compat)
    ours = reference_2d(image, unary, gaussian, bilateral, params.iterations)
    assert_marginals_match(ours, run_densecrf2d(dcrf, image, unary, params), unary)


def compat_of_kind(kind: str, weight: float, labels: int, rng: np.random.Generator):
    """A pydensecrf compat argument: Potts number, (M,) vector or asymmetric (M, M)."""
    if kind == "potts":
        return weight
    if kind == "diagonal":
        return -weight * rng.uniform(0.5, 1.5, size=labels).astype(np.float32)
    # An asymmetric matrix: the symmetrisation 0.5 (m + m^T) is part of what is tested.
    return -weight * rng.uniform(0.0, 1.0, size=(labels, labels)).astype(np.float32)


@pytest.mark.parametrize("kind", ["potts", "diagonal", "matrix"])
@pytest.mark.parametrize(
    "normalization",
    [
        dcrf.NO_NORMALIZATION,
        dcrf.NORMALIZE_BEFORE,
        dcrf.NORMALIZE_AFTER,
        dcrf.NORMALIZE_SYMMETRIC,
    ],
)
def test_normalizations_and_compatibilities(normalization, kind):
    """Each normalisation mode with each compatibility kind, 5 labels, odd-sized crop."""
    image, unary = photo_case("chelsea", 47, 61, labels=5, seed=3)
    rng = np.random.default_rng(int(normalization) * 3 + len(kind))
    # Without normalisation the filter sums ~100 neighbours: smaller weights keep it sane.
    scale = 0.05 if normalization == dcrf.NO_NORMALIZATION else 1.0
    gaussian = (3, compat_of_kind(kind, 3 * scale, 5, rng))
    bilateral = (20, 13, compat_of_kind(kind, 10 * scale, 5, rng))
    ours = reference_2d(image, unary, gaussian, bilateral, 5, normalization)
    theirs = pydensecrf_2d(image, unary, gaussian, bilateral, 5, normalization)
    assert_marginals_match(ours, theirs, unary)


@pytest.mark.parametrize("kind", ["potts", "diagonal", "matrix"])
@pytest.mark.parametrize("labels", [1, 2])
@pytest.mark.parametrize(
    "normalization", [dcrf.NO_NORMALIZATION, dcrf.NORMALIZE_AFTER, dcrf.NORMALIZE_SYMMETRIC]
)
def test_one_and_two_labels(labels, normalization, kind):
    """M <= 2 takes pydensecrf's scalar filter path (double blur, (w*v)*alpha slice)."""
    image, unary = photo_case("astronaut", 45, 59, labels=labels, seed=labels)
    rng = np.random.default_rng(labels)
    scale = 0.05 if normalization == dcrf.NO_NORMALIZATION else 1.0
    gaussian = (3, compat_of_kind(kind, 3 * scale, labels, rng))
    bilateral = (30, 13, compat_of_kind(kind, 10 * scale, labels, rng))
    ours = reference_2d(image, unary, gaussian, bilateral, 10, normalization)
    theirs = pydensecrf_2d(image, unary, gaussian, bilateral, 10, normalization)
    assert_marginals_match(ours, theirs, unary)


def test_81_labels():
    image, unary = photo_case("rocket", 33, 41, labels=81, seed=81)
    gaussian, bilateral = (3, 3), (40, 13, 10)
    ours = reference_2d(image, unary, gaussian, bilateral, 10)
    assert_marginals_match(ours, pydensecrf_2d(image, unary, gaussian, bilateral, 10), unary)


def test_random_noise_image_and_unary():
    """Unstructured inputs at an odd size (37x23): uniform noise image, random unary."""
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, size=(23, 37, 3), dtype=np.uint8)
    unary = rng.uniform(0.0, 5.0, size=(4, 23 * 37)).astype(np.float32)
    gaussian, bilateral = (3, 3), (5, 20, 10)
    ours = reference_2d(image, unary, gaussian, bilateral, 10)
    assert_marginals_match(ours, pydensecrf_2d(image, unary, gaussian, bilateral, 10), unary)


def generic_crf_case(count: int, seed: int):
    """Features away from the origin, as DenseCRF.addPairwiseEnergy takes them."""
    rng = np.random.default_rng(seed)
    features = rng.uniform(0.3, 3.0, size=(3, count)).astype(np.float32)
    unary = rng.normal(size=(4, count)).astype(np.float32)
    crf = dcrf.DenseCRF(count, 4)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseEnergy(features, compat=5.0)
    expected = np.asarray(crf.inference(3))
    return features, unary, expected


def run_generic_reference(features, unary):
    q = reference.dense_crf_inference(
        torch.from_numpy(unary)[None],
        [torch.from_numpy(features)[None]],
        [torch.tensor(5.0)],
        [reference.NORMALIZE_SYMMETRIC],
        3,
    )
    return q[0].numpy()


def test_padding_points_of_the_embedding(monkeypatch):
    """pydensecrf embeds points in blocks of 4 and pads the last block with points at
    the origin; their vertices take part in the blur. With 41 points (41 % 4 != 0) and
    features away from the origin this shows: the reference matches pydensecrf only
    because it adds those vertices too."""
    features, unary, expected = generic_crf_case(41, seed=0)
    assert_marginals_match(run_generic_reference(features, unary), expected)
    monkeypatch.setattr(reference, "_EMBED_BLOCK", 1)
    without_padding = run_generic_reference(features, unary)
    assert np.abs(without_padding - expected).max() > 1e-3


def test_zero_iterations_is_softmax_of_minus_unary():
    image, unary = photo_case("coffee", 20, 30, labels=6, seed=5)
    ours = reference_2d(image, unary, (3, 3), (80, 13, 10), 0)
    expected = torch.softmax(-torch.from_numpy(unary), dim=0).numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        ours, pydensecrf_2d(image, unary, (3, 3), (80, 13, 10), 0), rtol=0, atol=1e-6
    )


def test_init_q_continues_like_step_inference():
    """Stepping with init_q equals pydensecrf's startInference + stepInference."""
    image, unary = photo_case("coffee", 31, 43, labels=5, seed=9)
    height, width = image.shape[:2]
    crf = dcrf.DenseCRF2D(width, height, 5)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=40, srgb=13, rgbim=image, compat=10)
    q, tmp1, tmp2 = crf.startInference()
    for _ in range(3):
        crf.stepInference(q, tmp1, tmp2)
    expected = np.asarray(q)

    features = [
        torch.from_numpy(grid_features(height, width, 3))[None],
        torch.from_numpy(bilateral_features(image, 40, 13))[None],
    ]
    args = (torch.from_numpy(unary)[None], features, [torch.tensor(3.0), torch.tensor(10.0)])
    symmetric = [reference.NORMALIZE_SYMMETRIC] * 2
    q_ref = reference.dense_crf_inference(*args, symmetric, 0)
    for _ in range(3):
        q_ref = reference.dense_crf_inference(*args, symmetric, 1, init_q=q_ref)
    assert_marginals_match(q_ref[0].numpy(), expected)
    in_one_go = reference.dense_crf_inference(*args, symmetric, 3)
    torch.testing.assert_close(q_ref, in_one_go, rtol=0, atol=1e-6)


def test_batch_equals_single_images_and_shared_features():
    """A batch of two images equals the images one by one; a Gaussian feature shared
    with expand (batch stride 0) is read per image like a copied one."""
    cases = [photo_case(name, 21, 27, labels=3, seed=i) for i, name in enumerate(PHOTOS[:2])]
    grid = torch.from_numpy(grid_features(21, 27, 3))
    unary = torch.stack([torch.from_numpy(u) for _, u in cases])
    bilateral = torch.stack([torch.from_numpy(bilateral_features(im, 30, 13)) for im, _ in cases])
    compat = [torch.tensor(3.0), torch.tensor(10.0)]
    symmetric = [reference.NORMALIZE_SYMMETRIC] * 2
    batched = reference.dense_crf_inference(
        unary, [grid[None].expand(2, -1, -1), bilateral], compat, symmetric, 5
    )
    assert batched.shape == (2, 3, 21 * 27) and batched.dtype == torch.float32
    for b, (image, single_unary) in enumerate(cases):
        expected = pydensecrf_2d(image, single_unary, (3, 3), (30, 13, 10), 5)
        assert_marginals_match(batched[b].numpy(), expected)


def test_rejects_mismatched_shapes():
    unary = torch.zeros(1, 3, 10)
    features = [torch.zeros(1, 2, 10)]
    with pytest.raises(ValueError, match="unary"):
        reference.dense_crf_inference(unary[0], features, [torch.tensor(1.0)], [3], 1)
    with pytest.raises(ValueError, match=r"features\[0\]"):
        reference.dense_crf_inference(unary, [torch.zeros(1, 2, 9)], [torch.tensor(1.0)], [3], 1)
    with pytest.raises(ValueError, match=r"compat\[0\]"):
        reference.dense_crf_inference(unary, features, [torch.zeros(4)], [3], 1)
    with pytest.raises(ValueError, match="normalization"):
        reference.dense_crf_inference(unary, features, [torch.tensor(1.0)], [7], 1)
    with pytest.raises(ValueError, match="iterations"):
        reference.dense_crf_inference(unary, features, [torch.tensor(1.0)], [3], -1)
    with pytest.raises(ValueError, match="unary must be float32"):
        reference.dense_crf_inference(unary.double(), features, [torch.tensor(1.0)], [3], 1)
    with pytest.raises(ValueError, match="unary contains NaN"):
        reference.dense_crf_inference(unary / 0, features, [torch.tensor(1.0)], [3], 1)
    with pytest.raises(ValueError, match="init_q"):
        reference.dense_crf_inference(
            unary, features, [torch.tensor(1.0)], [3], 1, init_q=torch.zeros(1, 2, 10)
        )
