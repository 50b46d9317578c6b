"""The compiled dense CRF (torch.ops.wsss_fast.dense_crf_inference) and its two faces,
the drop-in ``wsss_fast.crf`` and the batched ``wsss_fast.ops.dense_crf``.

Compared against pydensecrf2 (when installed) and against the numpy reference, which
is an independent implementation of the same algorithm (tests/test_crf_reference.py
checks it against pydensecrf2). Also: init_q and stepping, batching, backends, opcheck
and every ValueError of the Python faces and of the op's argument checks.
"""

import threading
import time

import cv2
import numpy as np
import pytest
import torch

import wsss_fast.crf as wcrf
from tests.crf_inputs import (
    PARAMETER_SETS,
    PHOTOS,
    bilateral_features,
    densecrf2d,
    grid_features,
    load_photo,
    marginal_differences,
    opcheck_arguments,
    run_densecrf2d,
    synthetic_softmax,
    unary_from_softmax,
)
from wsss_fast._extension import has_cuda_kernels
from wsss_fast.ops import dense_crf, dense_crf_inference
from wsss_fast.ops._backend import BACKEND_ENV_VAR
from wsss_fast.ops.dense_crf import STRIP_ORDER_MIN_SXY, pixel_grid_features, strip_grid_width
from wsss_fast.reference import dense_crf as reference

try:
    import pydensecrf.densecrf as pdcrf
    import pydensecrf.utils as putils
except ImportError:
    pdcrf = putils = None

needs_pydensecrf = pytest.mark.skipif(pdcrf is None, reason="pydensecrf2 is not installed")

MAX_ABS_DIFF = 1e-4
MIN_ARGMAX_AGREEMENT = 0.9999
NORMALIZATIONS = (
    wcrf.NO_NORMALIZATION,
    wcrf.NORMALIZE_BEFORE,
    wcrf.NORMALIZE_AFTER,
    wcrf.NORMALIZE_SYMMETRIC,
)
OP = torch.ops.wsss_fast.dense_crf_inference


def assert_marginals_match(ours, theirs, max_abs=MAX_ABS_DIFF) -> None:
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.dtype == np.float32
    diff, agreement = marginal_differences(ours, theirs)
    assert diff <= max_abs, f"max abs difference {diff:.3g}"
    assert agreement >= MIN_ARGMAX_AGREEMENT, f"argmax agreement {agreement:.6f}"


def small_photo(name: str, width: int, height: int) -> np.ndarray:
    """A photo resized to an odd size: structured content at any shape."""
    image = cv2.resize(load_photo(name), (width, height), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image)


def structured_case(width: int, height: int, labels: int, seed: int = 0):
    """(image uint8 (H, W, 3), unary float32 (M, N)) from a photo and synthetic scores."""
    image = small_photo(PHOTOS[seed % len(PHOTOS)], width, height)
    return image, unary_from_softmax(synthetic_softmax(image, labels, seed=seed, segments=6))


def random_case(width: int, height: int, labels: int, seed: int = 0):
    """Uniform noise image and random energies: no structure at all."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    unary = rng.uniform(0.0, 4.0, size=(labels, width * height)).astype(np.float32)
    return image, unary


def compat_of_kind(kind: str, weight: float, labels: int, seed: int):
    """pydensecrf compat argument: Potts number, (M,) vector or asymmetric (M, M)."""
    rng = np.random.default_rng(seed)
    if kind == "potts":
        return weight
    if kind == "diagonal":
        return -weight * rng.uniform(0.5, 1.5, size=labels).astype(np.float32)
    return -weight * rng.uniform(0.0, 1.0, size=(labels, labels)).astype(np.float32)


def crf_2d(module, image, unary, gaussian, bilateral, normalization=wcrf.NORMALIZE_SYMMETRIC):
    """A DenseCRF2D of ``module`` (wsss_fast.crf or pydensecrf.densecrf), set up."""
    return densecrf2d(module, image, unary, gaussian, bilateral, normalization)


def reference_2d(image, unary, gaussian, bilateral, iterations, normalization):
    """The numpy reference's marginals (M, N) for the same set-up as crf_2d."""
    height, width = image.shape[:2]
    features, compat = [], []
    if gaussian is not None:
        features.append(torch.from_numpy(grid_features(height, width, gaussian[0]))[None])
        compat.append(torch.as_tensor(np.asarray(gaussian[1], dtype=np.float32)))
    if bilateral is not None:
        features.append(
            torch.from_numpy(bilateral_features(image, bilateral[0], bilateral[1]))[None]
        )
        compat.append(torch.as_tensor(np.asarray(bilateral[2], dtype=np.float32)))
    q = reference.dense_crf_inference(
        torch.from_numpy(unary)[None],
        features,
        compat,
        [int(normalization)] * len(features),
        iterations,
    )
    return q[0].numpy()


# --- The criterion: real photographs, every parameter set ---------------------


@needs_pydensecrf
@pytest.mark.parametrize("name", sorted(PARAMETER_SETS))
def test_parameter_sets_match_pydensecrf_on_photos(name):
    """500x375 photo, 21 labels, 10 iterations: max abs <= 1e-4, argmax >= 99.99%."""
    params = PARAMETER_SETS[name]
    index = sorted(PARAMETER_SETS).index(name)
    image = load_photo(PHOTOS[index % len(PHOTOS)])
    assert image.shape == (375, 500, 3)
    unary = params.make_unary(synthetic_softmax(image, 21, seed=index))
    ours = run_densecrf2d(wcrf, image, unary, params)
    theirs = run_densecrf2d(pdcrf, image, unary, params)
    assert ours.shape == (21, 500 * 375)
    assert_marginals_match(ours, theirs)
    changed = float((theirs.argmax(axis=0) != unary.argmin(axis=0)).mean())
    assert changed > 0.02, "inputs too easy: the CRF hardly changes the labels"


@needs_pydensecrf
def test_helpers_equal_pydensecrf_utils():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), size=(7, 9)).transpose(2, 0, 1)  # float64 (5, 7, 9)
    probs[0, 0, 0] = 0.0
    for kwargs in ({}, {"scale": 0.8}, {"clip": None}, {"scale": 0.5, "clip": 1e-3}):
        with np.errstate(divide="ignore"):
            ours = wcrf.unary_from_softmax(probs, **kwargs)
            theirs = putils.unary_from_softmax(probs, **kwargs)
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, theirs)
    labels = rng.integers(0, 6, size=(7, 9))
    for zero_unsure in (True, False):
        ours = wcrf.unary_from_labels(labels, 6 - zero_unsure, 0.7, zero_unsure=zero_unsure)
        theirs = putils.unary_from_labels(labels, 6 - zero_unsure, 0.7, zero_unsure=zero_unsure)
        np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(
        wcrf.create_pairwise_gaussian((3, 5), (7, 9)),
        putils.create_pairwise_gaussian((3, 5), (7, 9)),
    )
    image = rng.integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        wcrf.create_pairwise_bilateral((3, 5), (13, 11, 7), image, chdim=2),
        putils.create_pairwise_bilateral((3, 5), (13, 11, 7), image, chdim=2),
    )


# --- Odd sizes, label counts, normalisations and compatibilities ---------------------


@pytest.mark.parametrize("kind", ["potts", "diagonal", "matrix"])
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("make_case", [structured_case, random_case], ids=["photo", "noise"])
def test_normalizations_and_compatibilities(make_case, normalization, kind):
    """37x23, 5 labels: compiled op (through wsss_fast.crf) against the reference and,
    when installed, pydensecrf2."""
    image, unary = make_case(37, 23, 5, seed=3)
    # Without normalisation the filter sums ~100 neighbours: smaller weights keep it sane.
    scale = 0.05 if normalization == wcrf.NO_NORMALIZATION else 1.0
    gaussian = (3, compat_of_kind(kind, 3 * scale, 5, seed=1))
    bilateral = (20, 13, compat_of_kind(kind, 5 * scale, 5, seed=2))
    ours = crf_2d(wcrf, image, unary, gaussian, bilateral, normalization).inference(5)
    expected = reference_2d(image, unary, gaussian, bilateral, 5, normalization)
    assert_marginals_match(ours, expected)
    if pdcrf is not None:
        theirs = crf_2d(pdcrf, image, unary, gaussian, bilateral, normalization).inference(5)
        assert_marginals_match(ours, theirs)


@pytest.mark.parametrize("labels", [1, 2, 19, 22, 81])
@pytest.mark.parametrize("make_case", [structured_case, random_case], ids=["photo", "noise"])
def test_label_counts(make_case, labels):
    """1 and 2 labels (pydensecrf's scalar filter path), 19, 22 and 81 labels, at 29x19.
    The CPU op keeps a kernel's weights in the padding lanes of the -unary rows where
    they fit: the bilateral kernel's at 1, 2 and 81 labels, the Gaussian's at 19 (and
    21), none at 22."""
    image, unary = make_case(29, 19, labels, seed=labels)
    gaussian, bilateral = (3, 3), (30, 13, 5)
    ours = crf_2d(wcrf, image, unary, gaussian, bilateral).inference(10)
    assert ours.shape == (labels, 29 * 19)
    expected = reference_2d(image, unary, gaussian, bilateral, 10, wcrf.NORMALIZE_SYMMETRIC)
    assert_marginals_match(ours, expected)
    if pdcrf is not None:
        assert_marginals_match(ours, crf_2d(pdcrf, image, unary, gaussian, bilateral).inference(10))


@pytest.mark.parametrize(
    ("count", "dim", "spread"),
    [
        (40, 3, 0.0),
        (41, 3, 0.0),
        (851, 3, 0.0),
        (851, 5, 0.0),
        (851, 5, 300.0),
        (853, 3, 2e5),
        (853, 5, 2e5),
        (2001, 2, 0.0),
        (77, 2, 1e6),
    ],
)
def test_generic_features_and_embedding_padding(count, dim, spread):
    """DenseCRF.addPairwiseEnergy with d-dimensional features away from the origin.
    pydensecrf embeds points in blocks of 4 and pads the last block with points at the
    origin, whose lattice vertices take part in the blur: with count % 4 != 0 those
    extra vertices change the result, and the op must add them too. d = 5 takes the
    vectorised embedding; with `spread`, the points form clusters that far apart. The
    vertex map's forms: a plain array for keys packed into few bits (2001 points, d =
    2); keys packed into 40 bits or fewer share a word with the id (no spread); 300 for
    d = 5, 2e5 for d = 3 and 1e6 for d = 2 need 41-64 bits (16-byte slots); 2e5 for
    d = 5 no longer packs into 64 bits (hashed keys)."""
    rng = np.random.default_rng(count)
    centres = rng.uniform(0.0, spread, size=(dim, 8))
    features = centres[:, rng.integers(0, 8, size=count)] + rng.uniform(0.3, 3.0, (dim, count))
    features = features.astype(np.float32)
    unary = rng.normal(size=(4, count)).astype(np.float32)
    crf = wcrf.DenseCRF(count, 4)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseEnergy(features, compat=5.0)
    ours = crf.inference(3)
    expected = reference.dense_crf_inference(
        torch.from_numpy(unary)[None],
        [torch.from_numpy(features)[None]],
        [torch.tensor(5.0)],
        [reference.NORMALIZE_SYMMETRIC],
        3,
    )[0].numpy()
    assert_marginals_match(ours, expected)
    if pdcrf is not None:
        theirs = pdcrf.DenseCRF(count, 4)
        theirs.setUnaryEnergy(unary)
        theirs.addPairwiseEnergy(features, compat=5.0)
        assert_marginals_match(ours, theirs.inference(3))


# --- init_q, stepping, zero iterations ------------------------------------------------


def op_arguments(image, unary, gaussian=(3, 3.0), bilateral=(40, 13, 10.0)):
    """Arguments (unary, features, compat, normalization) of the op for one image."""
    height, width = image.shape[:2]
    features = [
        torch.from_numpy(grid_features(height, width, gaussian[0]))[None],
        torch.from_numpy(bilateral_features(image, bilateral[0], bilateral[1]))[None],
    ]
    compat = [torch.tensor(float(gaussian[1])), torch.tensor(float(bilateral[2]))]
    return torch.from_numpy(unary)[None], features, compat, [wcrf.NORMALIZE_SYMMETRIC] * 2


def test_init_q_and_step_inference_equal_inference():
    image, unary = structured_case(31, 27, 5, seed=4)
    args = op_arguments(image, unary)
    in_one_go = OP(*args, 4)
    start = torch.softmax(-args[0], dim=1)
    torch.testing.assert_close(OP(*args, 4, start), in_one_go, rtol=0, atol=1e-6)
    torch.testing.assert_close(OP(*args, 0, start), start, rtol=0, atol=0)
    q = OP(*args, 1)
    q = OP(*args, 3, q)
    torch.testing.assert_close(q, in_one_go, rtol=0, atol=1e-6)

    crf = crf_2d(wcrf, image, unary, (3, 3), (40, 13, 10))
    q, tmp1, tmp2 = crf.startInference()
    np.testing.assert_allclose(q, crf.inference(0), rtol=0, atol=1e-7)
    for _ in range(4):
        crf.stepInference(q, tmp1, tmp2)
    np.testing.assert_allclose(q, in_one_go[0].numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(q, crf.inference(4), rtol=0, atol=1e-6)
    if pdcrf is not None:
        theirs = crf_2d(pdcrf, image, unary, (3, 3), (40, 13, 10))
        q_theirs, tmp1, tmp2 = theirs.startInference()
        for _ in range(4):
            theirs.stepInference(q_theirs, tmp1, tmp2)
        assert_marginals_match(q, np.asarray(q_theirs))


def test_zero_iterations_return_softmax_of_minus_unary():
    image, unary = structured_case(23, 17, 6, seed=6)
    args = op_arguments(image, unary)
    expected = torch.softmax(-args[0], dim=1)
    torch.testing.assert_close(OP(*args, 0), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        dense_crf_inference(*args, 0, backend="reference"), expected, rtol=0, atol=1e-6
    )
    crf = crf_2d(wcrf, image, unary, (3, 3), (40, 13, 10))
    np.testing.assert_allclose(crf.inference(0), expected[0].numpy(), rtol=0, atol=1e-6)

    probs = torch.from_numpy(synthetic_softmax(image, 6, seed=6))[None]
    images = torch.from_numpy(image).permute(2, 0, 1)[None]
    clipped = probs.clamp(1e-5, 1.0)
    torch.testing.assert_close(
        dense_crf(images, probs, iterations=0),
        clipped / clipped.sum(dim=1, keepdim=True),
        rtol=0,
        atol=1e-6,
    )


# --- The batched op ------------------------------------------------------------------


def photo_batch(width: int, height: int, labels: int):
    """uint8 (3, 3, H, W) images of three photos and float32 (3, M, H, W) probabilities."""
    images = [small_photo(name, width, height) for name in PHOTOS[:3]]
    probs = [synthetic_softmax(image, labels, seed=i) for i, image in enumerate(images)]
    return (
        torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
        torch.from_numpy(np.stack(probs)),
    )


def test_dense_crf_batch_equals_single_images():
    images, probs = photo_batch(61, 43, 7)
    batched = dense_crf(images, probs)
    assert batched.shape == probs.shape and batched.dtype == torch.float32
    for b in range(3):
        single = dense_crf(images[b : b + 1], probs[b : b + 1])
        torch.testing.assert_close(batched[b : b + 1], single, rtol=0, atol=1e-6)


@pytest.fixture
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_one_thread_blur_wavefront_matches_reference(one_thread):
    """With one thread, a lattice of megabytes whose blur neighbours lie close in id
    (the Gaussian kernel at sxy = 1: a vertex for about every pixel) is blurred as a
    wavefront over chunks of vertices (csrc/crf/cpu/dense_crf_cpu.cpp, blur); every
    vertex must still get the plain passes' arithmetic."""
    image = small_photo(PHOTOS[1], 203, 151)  # ~35k Gaussian vertices x 24 floats: 3.4 MB
    unary = unary_from_softmax(synthetic_softmax(image, 21, seed=3))
    gaussian, bilateral = (1, 3.0), (121, 5, 4.0)
    ours = crf_2d(wcrf, image, unary, gaussian, bilateral).inference(10)
    expected = reference_2d(image, unary, gaussian, bilateral, 10, wcrf.NORMALIZE_SYMMETRIC)
    assert_marginals_match(ours, expected)


def test_lattice_with_more_vertices_than_16_bit_ids_matches_reference(one_thread):
    """The passes read vertex ids as uint16 where a lattice has fewer than 65535
    vertices, as int32 otherwise: the Gaussian kernel at sxy = 1 on 300x250 pixels
    has about 86k vertices (the bilateral here a few hundred), so both kinds meet."""
    image = small_photo(PHOTOS[0], 300, 250)
    unary = unary_from_softmax(synthetic_softmax(image, 5, seed=7))
    gaussian, bilateral = (1, 3.0), (80, 13, 10.0)
    ours = crf_2d(wcrf, image, unary, gaussian, bilateral).inference(3)
    expected = reference_2d(image, unary, gaussian, bilateral, 3, wcrf.NORMALIZE_SYMMETRIC)
    assert_marginals_match(ours, expected)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("labels", [21, 22])
def test_strip_order_equals_raster_order(labels, threads):
    """With grid_width, the CPU op visits the pixels in vertical strips of 64 columns
    (141 = 64 + 64 + 13 here) instead of raster order: the same marginals up to the
    rounding of sums formed in another order, from softmax(-unary) and from init_q.
    21 labels carry the Gaussian kernel's weights in the -unary rows' padding lanes, 22
    do not."""
    image, unary = structured_case(141, 13, labels, seed=labels)
    args = op_arguments(image, unary)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        raster = OP(*args, 5)
        strips = OP(*args, 5, grid_width=141)
        torch.testing.assert_close(strips, raster, rtol=0, atol=1e-6)
        start = OP(*args, 2, grid_width=141)
        stepped = OP(*args, 3, start, grid_width=141)
        torch.testing.assert_close(stepped, raster, rtol=0, atol=1e-6)
    finally:
        torch.set_num_threads(saved)
    expected = reference_2d(image, unary, (3, 3.0), (40, 13, 10.0), 5, wcrf.NORMALIZE_SYMMETRIC)
    assert_marginals_match(strips[0].numpy(), expected)


def test_strip_order_is_chosen_by_the_spatial_scale(monkeypatch):
    """DenseCRF2D and dense_crf ask for strips when every kernel's spatial standard
    deviation is at least STRIP_ORDER_MIN_SXY, else (and for features of unknown
    scale, from addPairwiseEnergy) for raster order."""
    image, unary = structured_case(141, 13, 4, seed=2)
    seen = []
    original = torch.ops.wsss_fast.dense_crf_inference

    def spy(*args):  # the wrapper passes every argument by position
        seen.append(args[6])
        return original(*args)

    monkeypatch.setattr(torch.ops.wsss_fast, "dense_crf_inference", spy)
    crf_2d(wcrf, image, unary, (3, 3), (80, 13, 10)).inference(1)
    crf_2d(wcrf, image, unary, (1, 3), (80, 13, 10)).inference(1)
    crf = crf_2d(wcrf, image, unary, (3, 3), None)
    crf.addPairwiseEnergy(np.ones((2, 141 * 13), np.float32), compat=1.0)
    crf.inference(1)
    images = torch.from_numpy(image).permute(2, 0, 1)[None]
    probs = torch.from_numpy(synthetic_softmax(image, 4, seed=2))[None]
    dense_crf(images, probs, iterations=1)
    dense_crf(images, probs, gaussian=(1.5, 3), iterations=1)
    assert seen == [141, 0, 0, 141, 0]
    assert strip_grid_width(141, [STRIP_ORDER_MIN_SXY, 80.0]) == 141
    assert strip_grid_width(141, []) == 141
    assert strip_grid_width(141, None) == 0


def test_reused_buffers_change_no_result():
    """Buffers of a megabyte and more are pooled between calls (csrc/crf/cpu/
    large_buffer.h): a live output must never be handed out again, and a recycled
    block's old contents must never leak into a result."""
    images, probs = photo_batch(161, 121, 21)  # (3, 21, 121, 161) float32: 4.9 MB
    first = dense_crf(images, probs)
    kept = first.clone()
    for width, height in [(161, 121), (97, 143), (161, 121)]:
        other_images, other_probs = photo_batch(width, height, 21)
        again = dense_crf(other_images.flip(-1).contiguous(), other_probs.flip(-1).contiguous())
        del again
    torch.testing.assert_close(first, kept, rtol=0, atol=0)
    torch.testing.assert_close(dense_crf(images, probs), kept, rtol=0, atol=0)


@needs_pydensecrf
def test_dense_crf_equals_pydensecrf_with_unary_from_softmax():
    images, probs = photo_batch(61, 43, 7)
    refined = dense_crf(images, probs, gaussian=(3, 3), bilateral=(80, 13, 10), iterations=10)
    for b in range(3):
        image = np.ascontiguousarray(images[b].permute(1, 2, 0).numpy())
        unary = np.ascontiguousarray(putils.unary_from_softmax(probs[b].numpy()))
        theirs = crf_2d(pdcrf, image, unary, (3, 3), (80, 13, 10)).inference(10)
        assert_marginals_match(refined[b].reshape(7, -1).numpy(), theirs)


def test_shared_features_with_expand_equal_copies():
    """A Gaussian feature shared across the batch with expand (batch stride 0) gives
    the same result as a copy per image."""
    images, probs = photo_batch(37, 23, 4)
    height, width = images.shape[2:]
    unary = -torch.log(probs.clamp(1e-5, 1.0)).reshape(3, 4, -1)
    grid = torch.from_numpy(grid_features(height, width, 3))
    bilateral = torch.stack(
        [
            torch.from_numpy(bilateral_features(images[b].permute(1, 2, 0).numpy(), 40, 13))
            for b in range(3)
        ]
    )
    compat = [torch.tensor(3.0), torch.tensor(10.0)]
    symmetric = [wcrf.NORMALIZE_SYMMETRIC] * 2
    shared = grid[None].expand(3, -1, -1)
    assert shared.stride(0) == 0
    with_expand = OP(unary, [shared, bilateral], compat, symmetric, 5)
    with_copies = OP(unary, [shared.contiguous(), bilateral], compat, symmetric, 5)
    torch.testing.assert_close(with_expand, with_copies, rtol=0, atol=1e-6)
    expected = reference.dense_crf_inference(unary, [shared, bilateral], compat, symmetric, 5)
    for b in range(3):
        assert_marginals_match(with_expand[b].numpy(), expected[b].numpy())


# --- Backends ------------------------------------------------------------------------


def test_reference_backend_agrees_and_is_chosen(monkeypatch):
    images, probs = photo_batch(29, 21, 5)
    compiled = dense_crf(images, probs, backend="compiled")
    by_argument = dense_crf(images, probs, backend="reference")
    for b in range(3):
        assert_marginals_match(compiled[b].reshape(5, -1).numpy(), by_argument[b].reshape(5, -1))

    calls = []
    original = reference.dense_crf_inference

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(reference, "dense_crf_inference", spy)
    monkeypatch.setenv(BACKEND_ENV_VAR, "reference")
    by_environment = dense_crf(images, probs)
    assert calls == [1]
    torch.testing.assert_close(by_environment, by_argument, rtol=0, atol=0)
    dense_crf(images, probs, backend="compiled")  # the argument wins over the variable
    assert calls == [1]


# --- opcheck -------------------------------------------------------------------------


@pytest.mark.parametrize("case", range(len(opcheck_arguments("cpu"))))
def test_opcheck(case):
    args, kwargs = opcheck_arguments("cpu")[case]
    torch.library.opcheck(OP, args, kwargs)


def test_finite_copy_copies_and_checks():
    """wsss_fast::finite_copy, the drop-in's copy of its input arrays: equal values in
    memory of its own, a ValueError naming the array on NaN or infinity."""
    values = torch.randn(3, 70001)  # over 1 MiB: a block from the pool
    copy = torch.ops.wsss_fast.finite_copy(values, "unary")
    assert copy.data_ptr() != values.data_ptr()
    torch.testing.assert_close(copy, values, rtol=0, atol=0)
    torch.testing.assert_close(
        torch.ops.wsss_fast.finite_copy(values[:, ::2], "unary"), values[:, ::2], rtol=0, atol=0
    )
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = values.clone()
        broken[2, 70000] = bad
        with pytest.raises(ValueError, match="Q contains NaN or infinite"):
            torch.ops.wsss_fast.finite_copy(broken, "Q")
    with pytest.raises(ValueError, match="features must be float32"):
        torch.ops.wsss_fast.finite_copy(values.double(), "features")
    torch.library.opcheck(torch.ops.wsss_fast.finite_copy, (torch.randn(4, 5), "unary"))


# --- Inputs that are safe to convert ---------------------------------------------------


def test_safe_conversions_give_the_same_result():
    image, unary = structured_case(33, 21, 4, seed=2)
    expected = crf_2d(wcrf, image, unary, (3, 3), (40, 13, 10)).inference(3)

    def run(image_in, unary_in, compat=10):
        return crf_2d(wcrf, image_in, unary_in, (3, 3), (40, 13, compat)).inference(3)

    np.testing.assert_array_equal(run(image, unary.astype(np.float64)), expected)
    np.testing.assert_array_equal(run(image, np.asfortranarray(unary)), expected)
    wide = np.zeros((4, 2 * unary.shape[1]), dtype=np.float32)
    wide[:, ::2] = unary
    np.testing.assert_array_equal(run(image, wide[:, ::2]), expected)
    np.testing.assert_array_equal(run(image.astype(np.float64), unary), expected)
    np.testing.assert_array_equal(run(image.astype(np.int64), unary), expected)
    np.testing.assert_array_equal(run(np.asfortranarray(image), unary), expected)
    big = np.zeros((2 * 21, 2 * 33, 3), dtype=np.uint8)
    big[::2, ::2] = image
    np.testing.assert_array_equal(run(big[::2, ::2], unary), expected)
    np.testing.assert_array_equal(run(image, unary, compat=np.float64(10)), expected)
    half = unary.astype(np.float16)
    np.testing.assert_array_equal(run(image, half), run(image, half.astype(np.float32)))

    images, probs = photo_batch(29, 21, 5)
    refined = dense_crf(images, probs)
    torch.testing.assert_close(dense_crf(images, probs.double()), refined, rtol=0, atol=0)
    channels_last = images.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(dense_crf(channels_last, probs), refined, rtol=0, atol=0)
    half = probs.half()
    torch.testing.assert_close(dense_crf(images, half), dense_crf(images, half.float()))


def test_set_unary_energy_copies_its_argument():
    """pydensecrf copies arrays on set; changing them afterwards changes nothing."""
    image, unary = structured_case(19, 13, 3, seed=1)
    compat = np.full(3, -3.0, dtype=np.float32)
    crf = crf_2d(wcrf, image, unary, (3, compat), (40, 13, 10))
    expected = crf.inference(3)
    unary[:] = 0.0
    compat[:] = 0.0
    np.testing.assert_array_equal(crf.inference(3), expected)


# --- Errors --------------------------------------------------------------------------


def crf_with_unary(width=6, height=5, labels=3) -> wcrf.DenseCRF2D:
    crf = wcrf.DenseCRF2D(width, height, labels)
    crf.setUnaryEnergy(np.zeros((labels, width * height), dtype=np.float32))
    return crf


IMAGE_6X5 = np.zeros((5, 6, 3), dtype=np.uint8)

DROP_IN_ERRORS = [
    (lambda: wcrf.DenseCRF(0, 3), "nvar"),
    (lambda: wcrf.DenseCRF(10, 0), "nlabels"),
    (lambda: wcrf.DenseCRF2D(0, 5, 3), "w and h"),
    (lambda: wcrf.DenseCRF2D(6, 5, 3).setUnaryEnergy(np.zeros((4, 30))), r"unary .*\(3, 30\)"),
    (lambda: wcrf.DenseCRF2D(6, 5, 3).setUnaryEnergy(np.zeros((3, 31))), r"unary .*\(3, 30\)"),
    (lambda: wcrf.DenseCRF2D(6, 5, 3).setUnaryEnergy(np.zeros(90)), "unary"),
    (lambda: wcrf.DenseCRF2D(6, 5, 3).setUnaryEnergy(np.full((3, 30), np.nan)), "unary.*NaN"),
    (lambda: wcrf.DenseCRF2D(6, 5, 3).setUnaryEnergy(np.full((3, 30), np.inf)), "unary.*NaN"),
    (lambda: wcrf.DenseCRF2D(6, 5, 3).setUnaryEnergy(np.zeros((3, 30), bool)), "unary"),
    (lambda: wcrf.DenseCRF2D(6, 5, 3).setUnaryEnergy(np.zeros((3, 30)), np.zeros(3)), "logistic"),
    (lambda: wcrf.DenseCRF2D(6, 5, 3).inference(1), "setUnaryEnergy"),
    (lambda: crf_with_unary().inference(-1), "n_iterations"),
    (lambda: crf_with_unary().addPairwiseGaussian(sxy=0, compat=3), "sxy"),
    (lambda: crf_with_unary().addPairwiseGaussian(sxy=-3, compat=3), "sxy"),
    (lambda: crf_with_unary().addPairwiseGaussian(sxy=(3, 3, 3), compat=3), "sxy"),
    (lambda: crf_with_unary().addPairwiseGaussian(sxy=float("nan"), compat=3), "sxy"),
    (lambda: crf_with_unary().addPairwiseGaussian(sxy=3, compat=np.ones(4)), "compat"),
    (lambda: crf_with_unary().addPairwiseGaussian(sxy=3, compat=np.ones((3, 4))), "compat"),
    (lambda: crf_with_unary().addPairwiseGaussian(sxy=3, compat=np.ones((3, 3, 3))), "compat"),
    (lambda: crf_with_unary().addPairwiseGaussian(sxy=3, compat=float("inf")), "compat"),
    (lambda: crf_with_unary().addPairwiseGaussian(sxy=3, compat=3, kernel=7), "kernel"),
    (lambda: crf_with_unary().addPairwiseGaussian(sxy=3, compat=3, normalization=9), "normaliz"),
    (
        lambda: crf_with_unary().addPairwiseBilateral(
            sxy=3, srgb=13, rgbim=np.zeros((5, 7, 3), np.uint8), compat=3
        ),
        r"rgbim .*\(5, 6, 3\)",
    ),
    (
        lambda: crf_with_unary().addPairwiseBilateral(
            sxy=3, srgb=13, rgbim=np.zeros((3, 5, 6), np.uint8), compat=3
        ),
        "rgbim.*channels first",
    ),
    (
        lambda: crf_with_unary().addPairwiseBilateral(
            sxy=3, srgb=13, rgbim=np.zeros((5, 6), np.uint8), compat=3
        ),
        "rgbim",
    ),
    (
        lambda: crf_with_unary().addPairwiseBilateral(
            sxy=3, srgb=13, rgbim=IMAGE_6X5 + 0.5, compat=3
        ),
        "rgbim",
    ),
    (
        lambda: crf_with_unary().addPairwiseBilateral(
            sxy=3, srgb=13, rgbim=IMAGE_6X5.astype(np.int32) + 300, compat=3
        ),
        "rgbim",
    ),
    (
        lambda: crf_with_unary().addPairwiseBilateral(
            sxy=3, srgb=13, rgbim=IMAGE_6X5.astype(np.int32) - 1, compat=3
        ),
        "rgbim",
    ),
    (
        lambda: crf_with_unary().addPairwiseBilateral(sxy=0, srgb=13, rgbim=IMAGE_6X5, compat=3),
        "sxy",
    ),
    (
        lambda: crf_with_unary().addPairwiseBilateral(sxy=3, srgb=0, rgbim=IMAGE_6X5, compat=3),
        "srgb",
    ),
    (
        lambda: crf_with_unary().addPairwiseBilateral(
            sxy=3, srgb=(13, 13, -1), rgbim=IMAGE_6X5, compat=3
        ),
        "srgb",
    ),
    (lambda: crf_with_unary().addPairwiseEnergy(np.zeros((2, 31)), compat=3), "features"),
    (lambda: crf_with_unary().addPairwiseEnergy(np.zeros((17, 30)), compat=3), "features"),
    (lambda: crf_with_unary().addPairwiseEnergy(np.zeros((0, 30)), compat=3), "features"),
    (
        lambda: crf_with_unary().stepInference(np.zeros((3, 30)), None, None),
        "Q",
    ),
    (lambda: wcrf.unary_from_softmax(np.ones(5)), "sm"),
    (lambda: wcrf.unary_from_softmax(np.ones((2, 5)), scale=0), "scale"),
    (lambda: wcrf.unary_from_softmax(np.ones((2, 5)), scale=1.5), "scale"),
    (lambda: wcrf.unary_from_labels(np.zeros(4, int), 3, gt_prob=1.0), "gt_prob"),
    (lambda: wcrf.unary_from_labels(np.zeros(4, int), 1, gt_prob=0.7), "n_labels"),
    (lambda: wcrf.unary_from_labels(np.zeros(4), 3, gt_prob=0.7), "labels"),
    (lambda: wcrf.unary_from_labels(np.array([0, 4]), 3, gt_prob=0.7), "labels"),
    (
        lambda: wcrf.unary_from_labels(np.array([0, 3]), 3, gt_prob=0.7, zero_unsure=False),
        "labels",
    ),
    (lambda: wcrf.unary_from_labels(np.array([-1, 1]), 3, gt_prob=0.7), "labels"),
    (lambda: wcrf.create_pairwise_gaussian((3, 0), (5, 6)), "sdims"),
    (lambda: wcrf.create_pairwise_bilateral((3, 3), (13, 0, 13), IMAGE_6X5, chdim=2), "schan"),
]


@pytest.mark.parametrize("call, match", DROP_IN_ERRORS)
def test_drop_in_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


IMAGES = torch.zeros(2, 3, 5, 6, dtype=torch.uint8)
PROBS = torch.full((2, 4, 5, 6), 0.25)

DENSE_CRF_ERRORS = [
    (lambda: dense_crf(IMAGES[0], PROBS), "images"),
    (lambda: dense_crf(IMAGES[:, :2], PROBS[:, :, :, :]), "images"),
    (lambda: dense_crf(IMAGES.permute(0, 2, 3, 1), PROBS), "images"),
    (lambda: dense_crf(IMAGES.float(), PROBS), "images must be uint8"),
    (lambda: dense_crf(IMAGES, PROBS[0]), "probs"),
    (lambda: dense_crf(IMAGES, (PROBS * 4).long()), "probs"),
    (lambda: dense_crf(IMAGES, PROBS.numpy()), "probs"),
    (lambda: dense_crf(IMAGES[:1], PROBS), "images .* do not match probs"),
    (lambda: dense_crf(IMAGES, PROBS[:, :, :4]), "images .* do not match probs"),
    (lambda: dense_crf(IMAGES, PROBS[:, :0]), "at least one label"),
    (lambda: dense_crf(IMAGES, PROBS, iterations=-1), "iterations"),
    (lambda: dense_crf(IMAGES, PROBS, iterations=2.5), "iterations"),
    (lambda: dense_crf(IMAGES, PROBS, gaussian=(3,)), "gaussian"),
    (lambda: dense_crf(IMAGES, PROBS, gaussian=(0, 3)), "gaussian"),
    (lambda: dense_crf(IMAGES, PROBS, bilateral=(80, -13, 10)), "bilateral"),
    (lambda: dense_crf(IMAGES, PROBS, bilateral=(80, 13)), "bilateral"),
    (lambda: dense_crf(IMAGES, PROBS.clone().fill_(float("nan"))), "probs .*NaN"),
    (lambda: dense_crf(IMAGES, PROBS, backend="bogus"), "backend"),
    (lambda: dense_crf(IMAGES, PROBS, backend="triton"), "not available"),
]


@pytest.mark.parametrize("call, match", DENSE_CRF_ERRORS)
def test_dense_crf_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_backend_environment_variable_must_be_known(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=BACKEND_ENV_VAR):
        dense_crf(IMAGES, PROBS)


UNARY = torch.zeros(1, 3, 10)
FEATURES = [torch.zeros(1, 2, 10)]
POTTS = [torch.tensor(3.0)]

OP_ERRORS = [
    (lambda: OP(UNARY[0], FEATURES, POTTS, [3], 1), "unary"),
    (lambda: OP(UNARY.double(), FEATURES, POTTS, [3], 1), "unary must be float32"),
    (lambda: OP(UNARY[:, :0], [torch.zeros(1, 2, 10)], POTTS, [3], 1), "unary"),
    (lambda: OP(UNARY.clone().fill_(float("nan")), FEATURES, POTTS, [3], 1), "unary"),
    (lambda: OP(UNARY, FEATURES, POTTS, [3], -1), "iterations"),
    (lambda: OP(UNARY, FEATURES, POTTS, [3, 3], 1), "one entry per kernel"),
    (lambda: OP(UNARY, [torch.zeros(1, 2, 9)], POTTS, [3], 1), r"features\[0\]"),
    (lambda: OP(UNARY, [torch.zeros(2, 2, 10)], POTTS, [3], 1), r"features\[0\]"),
    (lambda: OP(UNARY, [torch.zeros(1, 17, 10)], POTTS, [3], 1), r"features\[0\]"),
    (lambda: OP(UNARY, [torch.zeros(1, 2, 10).double()], POTTS, [3], 1), r"features\[0\]"),
    (lambda: OP(UNARY, [torch.full((1, 2, 10), float("inf"))], POTTS, [3], 1), r"features\[0\]"),
    (lambda: OP(UNARY, FEATURES, [torch.zeros(4)], [3], 1), r"compat\[0\]"),
    (lambda: OP(UNARY, FEATURES, [torch.zeros(3, 2)], [3], 1), r"compat\[0\]"),
    (lambda: OP(UNARY, FEATURES, [torch.tensor(3.0).double()], [3], 1), r"compat\[0\]"),
    (lambda: OP(UNARY, FEATURES, POTTS, [4], 1), r"normalization\[0\]"),
    (lambda: OP(UNARY, FEATURES, POTTS, [-1], 1), r"normalization\[0\]"),
    (lambda: OP(UNARY, FEATURES, POTTS, [3], 1, torch.zeros(1, 2, 10)), "init_q"),
    (lambda: OP(UNARY, FEATURES, POTTS, [3], 1, torch.zeros(1, 3, 10).double()), "init_q"),
    (lambda: OP(UNARY, FEATURES, POTTS, [3], 1, grid_width=-5), "grid_width"),
    (lambda: OP(UNARY, FEATURES, POTTS, [3], 1, grid_width=4), "grid_width"),
    (
        lambda: dense_crf_inference(
            UNARY, FEATURES, POTTS, [3], 1, grid_width=4, backend="reference"
        ),
        "grid_width",
    ),
]


@pytest.mark.parametrize("call, match", OP_ERRORS)
def test_op_argument_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- CUDA (skipped without a GPU and the extension's CUDA kernels) ------------------

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and has_cuda_kernels()),
    reason="needs a CUDA device and wsss_fast built with its CUDA kernels",
)


@pytest.mark.cuda
@needs_cuda
def test_cuda_batch_matches_cpu_on_photos():
    """The CUDA op against the CPU op: 3 photos at 500x375, 21 labels, 10 iterations."""
    images, probs = photo_batch(500, 375, 21)
    on_cpu = dense_crf(images, probs)
    on_gpu = dense_crf(images.cuda(), probs.cuda())
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
    for b in range(3):
        assert_marginals_match(
            on_gpu[b].reshape(21, -1).cpu().numpy(), on_cpu[b].reshape(21, -1).numpy()
        )


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("kind", ["potts", "diagonal", "matrix"])
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_cuda_matches_reference_at_odd_sizes(normalization, kind):
    image, unary = structured_case(37, 23, 5, seed=3)
    scale = 0.05 if normalization == wcrf.NO_NORMALIZATION else 1.0
    gaussian = (3, compat_of_kind(kind, 3 * scale, 5, seed=1))
    bilateral = (20, 13, compat_of_kind(kind, 5 * scale, 5, seed=2))
    crf = wcrf.DenseCRF2D(37, 23, 5, device="cuda")
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=gaussian[0], compat=gaussian[1], normalization=normalization)
    crf.addPairwiseBilateral(
        sxy=bilateral[0],
        srgb=bilateral[1],
        rgbim=image,
        compat=bilateral[2],
        normalization=normalization,
    )
    expected = reference_2d(image, unary, gaussian, bilateral, 5, normalization)
    assert_marginals_match(crf.inference(5), expected)
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in op_arguments(image, unary)]
    args[1] = [f.cuda() for f in args[1]]
    args[2] = [c.cuda() for c in args[2]]
    q = OP(*args, 4, torch.softmax(-args[0], dim=1))
    torch.testing.assert_close(q, OP(*args, 4), rtol=0, atol=1e-6)
    torch.library.opcheck(OP, (*args, 2))


def test_compiled_op_releases_the_gil():
    """While the op runs in one thread, Python code keeps running in another."""
    height, width, labels = 200, 250, 21
    unary = torch.rand(1, labels, height * width, generator=torch.Generator().manual_seed(3))
    grid = pixel_grid_features(height, width, (3.0, 3.0), "cpu")[None]
    finished = threading.Event()
    elapsed = []

    def run():
        start = time.perf_counter()
        OP(unary, [grid], [torch.tensor(3.0)], [wcrf.NORMALIZE_SYMMETRIC], 40)
        elapsed.append(time.perf_counter() - start)
        finished.set()

    worker = threading.Thread(target=run)
    worker.start()
    count = 0
    while not finished.is_set():
        count += 1
    worker.join()
    # Holding the GIL would leave this thread one switch interval (5 ms) at most.
    assert count / elapsed[0] > 2e5, f"{count} loop turns in {elapsed[0]:.3f} s of the op"
