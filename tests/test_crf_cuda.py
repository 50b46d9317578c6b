"""The CUDA dense CRF (torch.ops.wsss_fast.dense_crf_inference on CUDA tensors) against
the CPU op on the same inputs.

Both implement crf.md's algorithm; the CPU op is checked against pydensecrf2 in
tests/test_crf.py, so agreement here carries over. Criterion: max abs difference of the
marginals <= 1e-4 and argmax agreement >= 99.99% (on small images a disagreement is
accepted only at a near-tie of the CPU marginals). Also: the CUDA op is deterministic
(bitwise), a shared (expanded) lattice equals per-image copies, a batch equals its
images one by one, and opcheck. Skipped without a CUDA device or without the CUDA
kernels in the extension.
"""

import cv2
import numpy as np
import pytest
import torch

from tests.crf_inputs import (
    PARAMETER_SETS,
    PHOTOS,
    bilateral_features,
    grid_features,
    load_photo,
    opcheck_arguments,
    synthetic_softmax,
    unary_from_softmax,
)
from wsss_fast._extension import has_cuda_kernels
from wsss_fast.ops import dense_crf

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        not has_cuda_kernels(), reason="wsss_fast._C was built without its CUDA kernels"
    ),
]

OP = torch.ops.wsss_fast.dense_crf_inference
DEVICE = torch.device("cuda")
MAX_ABS_DIFF = 1e-4
MIN_ARGMAX_AGREEMENT = 0.9999
SYMMETRIC = 3
NORMALIZATIONS = (0, 1, 2, 3)  # none, before, after, symmetric


# --- Helpers ---------------------------------------------------------------------------


def to_device(tensor: torch.Tensor) -> torch.Tensor:
    """Copy to DEVICE, keeping a batch stride of 0 (an expanded, shared feature)."""
    if tensor.dim() == 3 and tensor.size(0) > 1 and tensor.stride(0) == 0:
        return tensor[0].to(DEVICE)[None].expand_as(tensor)
    return tensor.to(DEVICE)


def cuda_crf(unary, features, compat, normalization, iterations, init_q=None) -> torch.Tensor:
    """The CUDA op on copies of CPU inputs; the result back on the CPU."""
    q = OP(
        to_device(unary),
        [to_device(f) for f in features],
        [to_device(c) for c in compat],
        list(normalization),
        iterations,
        None if init_q is None else to_device(init_q),
    )
    assert q.device.type == DEVICE.type and q.dtype == torch.float32
    assert q.shape == unary.shape and q.is_contiguous()
    return q.cpu()


def cpu_crf(unary, features, compat, normalization, iterations, init_q=None) -> torch.Tensor:
    return OP(unary, list(features), list(compat), list(normalization), iterations, init_q)


def assert_marginals_match(ours: torch.Tensor, expected: torch.Tensor) -> None:
    """(B, M, N) marginals: max abs difference and argmax agreement."""
    assert ours.shape == expected.shape
    diff = (ours.double() - expected.double()).abs().max().item()
    assert diff <= MAX_ABS_DIFF, f"max abs difference {diff:.3g}"
    ours_label = ours.argmax(dim=1)
    expected_label = expected.argmax(dim=1)
    agreement = (ours_label == expected_label).double().mean().item()
    if agreement < MIN_ARGMAX_AGREEMENT:
        # Few pixels (small images): every disagreement must be a near-tie.
        top = expected.gather(1, expected_label[:, None])[:, 0]
        chosen = expected.gather(1, ours_label[:, None])[:, 0]
        gap = (top - chosen)[ours_label != expected_label].max().item()
        assert gap <= 2 * MAX_ABS_DIFF, f"argmax agreement {agreement:.6f}, CPU gap {gap:.3g}"


def assert_cuda_matches_cpu(unary, features, compat, normalization, iterations, init_q=None):
    ours = cuda_crf(unary, features, compat, normalization, iterations, init_q)
    expected = cpu_crf(unary, features, compat, normalization, iterations, init_q)
    assert_marginals_match(ours, expected)
    return ours, expected


def small_photo(name: str, width: int, height: int) -> np.ndarray:
    image = cv2.resize(load_photo(name), (width, height), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image)


def photo_inputs(width: int, height: int, labels: int, batch: int = 3, seed: int = 0):
    """Images uint8 (B, H, W, 3) of different photos and unary float32 (B, M, N)."""
    images, unaries = [], []
    for b in range(batch):
        image = small_photo(PHOTOS[(seed + b) % len(PHOTOS)], width, height)
        probs = synthetic_softmax(image, labels, seed=seed + b, segments=6)
        images.append(image)
        unaries.append(unary_from_softmax(probs))
    return np.stack(images), torch.from_numpy(np.stack(unaries))


def noise_inputs(width: int, height: int, labels: int, batch: int = 3, seed: int = 0):
    """Uniform noise images and random energies: no structure at all."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(batch, height, width, 3), dtype=np.uint8)
    unary = rng.uniform(0.0, 4.0, size=(batch, labels, width * height)).astype(np.float32)
    return images, torch.from_numpy(unary)


def crf_features(images: np.ndarray, gaussian_sxy: float, bilateral_sxy: float, srgb: float):
    """[Gaussian (expanded: one lattice for the batch), bilateral (one per image)]."""
    batch, height, width = images.shape[:3]
    grid = torch.from_numpy(grid_features(height, width, gaussian_sxy))
    bilateral = torch.stack(
        [torch.from_numpy(bilateral_features(image, bilateral_sxy, srgb)) for image in images]
    )
    return [grid[None].expand(batch, -1, -1), bilateral]


def compat_of_kind(kind: str, weight: float, labels: int, seed: int) -> torch.Tensor:
    """A 0-d Potts weight, an (M,) vector or an asymmetric (M, M) matrix."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "potts":
        return torch.tensor(float(weight))
    if kind == "diagonal":
        return -weight * (0.5 + torch.rand(labels, generator=generator))
    return -weight * torch.rand(labels, labels, generator=generator)


# --- Parity with the CPU op ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PARAMETER_SETS))
def test_parameter_sets_on_photos(name):
    """500x375 photos, 21 labels, each parameter set of crf.md, a batch of 2."""
    params = PARAMETER_SETS[name]
    index = sorted(PARAMETER_SETS).index(name)
    images = np.stack([load_photo(PHOTOS[(index + b) % len(PHOTOS)]) for b in range(2)])
    unary = torch.from_numpy(
        np.stack(
            [
                params.make_unary(synthetic_softmax(image, 21, seed=index + b))
                for b, image in enumerate(images)
            ]
        )
    )
    features = crf_features(
        images, params.gaussian_sxy, params.bilateral_sxy, params.bilateral_srgb
    )
    compat = [
        torch.tensor(float(params.gaussian_compat)),
        torch.tensor(float(params.bilateral_compat)),
    ]
    ours, _ = assert_cuda_matches_cpu(unary, features, compat, [SYMMETRIC] * 2, params.iterations)
    assert ours.shape == (2, 21, 500 * 375)


@pytest.mark.parametrize("labels", [1, 2, 21, 81])
@pytest.mark.parametrize("make_inputs", [photo_inputs, noise_inputs], ids=["photo", "noise"])
def test_odd_sizes_and_label_counts(make_inputs, labels):
    """37x23 (N odd, N % 4 != 0), a batch of 3 different images, 10 iterations."""
    images, unary = make_inputs(37, 23, labels, seed=labels)
    features = crf_features(images, 3, 30, 13)
    compat = [torch.tensor(3.0), torch.tensor(5.0)]
    assert_cuda_matches_cpu(unary, features, compat, [SYMMETRIC] * 2, 10)


@pytest.mark.parametrize("kind", ["potts", "diagonal", "matrix"])
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("make_inputs", [photo_inputs, noise_inputs], ids=["photo", "noise"])
def test_normalizations_and_compatibilities(make_inputs, normalization, kind):
    images, unary = make_inputs(31, 19, 5, seed=3)
    # Without normalisation the filter sums ~100 neighbours: smaller weights keep it sane.
    scale = 0.05 if normalization == 0 else 1.0
    features = crf_features(images, 3, 20, 13)
    compat = [
        compat_of_kind(kind, 3 * scale, 5, seed=1),
        compat_of_kind(kind, 5 * scale, 5, seed=2),
    ]
    assert_cuda_matches_cpu(unary, features, compat, [normalization] * 2, 5)


def test_mixed_kernels_more_than_one_launch_group():
    """Six kernels of every kind and normalisation (the fused update slices at most
    four per launch), and no kernel at all."""
    images, unary = photo_inputs(29, 17, 6, seed=5)
    gaussian, bilateral = crf_features(images, 3, 20, 13)
    features = [gaussian, bilateral, gaussian * 0.7, bilateral * 1.3, bilateral, gaussian]
    compat = [
        compat_of_kind("potts", 3, 6, 0),
        compat_of_kind("diagonal", 4, 6, 1),
        compat_of_kind("matrix", 2, 6, 2),
        compat_of_kind("potts", 1, 6, 3),
        compat_of_kind("matrix", 1, 6, 4),
        compat_of_kind("diagonal", 2, 6, 5),
    ]
    assert_cuda_matches_cpu(unary, features, compat, [3, 1, 2, 3, 3, 2], 4)
    assert_cuda_matches_cpu(unary, [], [], [], 3)


@pytest.mark.parametrize(("labels", "kind"), [(256, "diagonal"), (300, "potts"), (130, "matrix")])
def test_many_labels(labels, kind):
    """Label rows of several 32-lane chunks."""
    images, unary = noise_inputs(13, 11, labels, batch=2, seed=labels)
    features = crf_features(images, 3, 20, 13)
    compat = [compat_of_kind(kind, 3, labels, 1), compat_of_kind(kind, 5, labels, 2)]
    assert_cuda_matches_cpu(unary, features, compat, [SYMMETRIC] * 2, 3)


@pytest.mark.parametrize("points", [40, 41, 851])
def test_generic_features_and_padding_vertices(points):
    """3-d features away from the origin (pydensecrf's padding points then add lattice
    vertices when N % 4 != 0), 1-d features, and 16-d non-contiguous features."""
    generator = torch.Generator().manual_seed(points)
    unary = torch.randn(2, 4, points, generator=generator)
    generic = 0.3 + 2.7 * torch.rand(2, 3, points, generator=generator)
    one_d = 10 * torch.rand(2, 1, points, generator=generator)
    sixteen_d = (1.5 * torch.rand(2, points, 16, generator=generator)).transpose(1, 2)
    compat = [torch.tensor(5.0), torch.tensor(3.0), torch.tensor(2.0)]
    assert_cuda_matches_cpu(unary, [generic, one_d, sixteen_d], compat, [3, 2, 1], 3)


def test_init_q_and_zero_iterations():
    images, unary = photo_inputs(23, 17, 6, seed=6)
    features = crf_features(images, 3, 40, 13)
    compat = [torch.tensor(3.0), torch.tensor(10.0)]
    init_q = torch.softmax(torch.randn(unary.shape, generator=torch.Generator().manual_seed(1)), 1)
    assert_cuda_matches_cpu(unary, features, compat, [SYMMETRIC] * 2, 4, init_q)

    zero = cuda_crf(unary, features, compat, [SYMMETRIC] * 2, 0)
    torch.testing.assert_close(zero, torch.softmax(-unary, dim=1), rtol=0, atol=1e-6)
    assert torch.equal(cuda_crf(unary, features, compat, [SYMMETRIC] * 2, 0, init_q), init_q)

    # Stepping: 1 then 3 iterations from the result equals 4 in one go.
    in_one_go = cuda_crf(unary, features, compat, [SYMMETRIC] * 2, 4)
    stepped = cuda_crf(unary, features, compat, [SYMMETRIC] * 2, 1)
    stepped = cuda_crf(unary, features, compat, [SYMMETRIC] * 2, 3, stepped)
    torch.testing.assert_close(stepped, in_one_go, rtol=0, atol=1e-6)


# --- Properties of the CUDA op alone ----------------------------------------------------


def test_deterministic_shared_lattice_and_batching_are_bitwise_equal():
    """No float atomics: repeated runs are bitwise equal; so are a shared (expanded)
    lattice and per-image copies, and a batch and its images one by one."""
    images, unary = photo_inputs(41, 29, 21, seed=7)
    features = crf_features(images, 3, 80, 13)
    compat = [torch.tensor(3.0), torch.tensor(10.0)]
    symmetric = [SYMMETRIC] * 2
    first = cuda_crf(unary, features, compat, symmetric, 10)
    assert torch.equal(cuda_crf(unary, features, compat, symmetric, 10), first)
    copies = [features[0].contiguous(), features[1]]
    assert torch.equal(cuda_crf(unary, copies, compat, symmetric, 10), first)
    for b in range(unary.shape[0]):
        single = cuda_crf(unary[b : b + 1], [f[b : b + 1] for f in features], compat, symmetric, 10)
        assert torch.equal(single, first[b : b + 1])


def test_current_stream_is_used():
    images, unary = photo_inputs(33, 21, 5, seed=8)
    features = [to_device(f) for f in crf_features(images, 3, 40, 13)]
    compat = [torch.tensor(3.0, device=DEVICE), torch.tensor(10.0, device=DEVICE)]
    unary = unary.to(DEVICE)
    expected = OP(unary, features, compat, [SYMMETRIC] * 2, 5)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = OP(unary, features, compat, [SYMMETRIC] * 2, 5)
    side.synchronize()
    assert torch.equal(on_side, expected)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    images, unary = photo_inputs(21, 13, 4, seed=9)
    features = crf_features(images, 3, 40, 13)
    compat = [torch.tensor(3.0), torch.tensor(10.0)]
    device = torch.device("cuda", 1)
    q = OP(
        unary.to(device),
        [f.to(device) for f in features],
        [c.to(device) for c in compat],
        [SYMMETRIC] * 2,
        5,
    )
    assert q.device == device
    assert_marginals_match(q.cpu(), cpu_crf(unary, features, compat, [SYMMETRIC] * 2, 5))


def test_too_wide_lattice_is_a_value_error():
    """Features far too fine for their range would need more than 63 bits per key."""
    unary = torch.rand(2, 3, 50)
    features = [1e5 * torch.rand(2, 5, 50)]
    with pytest.raises(ValueError, match="63"):
        cuda_crf(unary, features, [torch.tensor(1.0)], [SYMMETRIC], 1)


def test_dense_crf_on_cuda_tensors():
    """The batched face keeps CUDA inputs on CUDA and agrees with the CPU path."""
    images, _ = photo_inputs(61, 43, 7, seed=10)
    probs = torch.softmax(
        torch.randn(3, 7, 43, 61, generator=torch.Generator().manual_seed(2)) * 3, dim=1
    )
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    on_cuda = dense_crf(images.to(DEVICE), probs.to(DEVICE))
    assert on_cuda.device.type == "cuda" and on_cuda.shape == probs.shape
    on_cpu = dense_crf(images, probs)
    assert_marginals_match(on_cuda.cpu().reshape(3, 7, -1), on_cpu.reshape(3, 7, -1))


@pytest.mark.parametrize("case", range(len(opcheck_arguments("cpu"))))
def test_opcheck(case):
    args, kwargs = opcheck_arguments(DEVICE)[case]
    torch.library.opcheck(OP, args, kwargs)
