"""refine_pixel_adaptive: fused (Triton; interpreted on CPU) against the ToCo-structured reference.

Every case draws fresh inputs from its own seed. The interpreter runs the kernels on
64-pixel blocks, so images of 9x11 to 19x23 pixels span two to seven blocks; the
dilation sets include rings larger than the image (replicate padding clamps them).
"""

import pytest
import torch

from wsss_fast.ops import refine_pixel_adaptive
from wsss_fast.reference import pixel_adaptive_refine as reference

# The Triton kernels run on CUDA tensors, or interpreted on CPU tensors (tests/conftest.py).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOCO_DILATIONS = (1, 2, 4, 8, 12, 24)


def make_inputs(seed, batch, classes, height, width, dtype=torch.float32):
    """Images in [0, 1] with smooth regions and edges (a blurred random field plus noise,
    so neighbour stds vary across the image) and softmax maps over the classes (random
    positive maps for a single class, which softmax would make constant)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, (height + 3) // 4, (width + 3) // 4, generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")
    images = (images + 0.05 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    logits = 3.0 * torch.randn(batch, classes, height, width, generator=generator)
    probs = logits.softmax(dim=1) if classes > 1 else torch.rand(logits.shape, generator=generator)
    return images.to(DEVICE, dtype), probs.to(DEVICE, dtype)


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


# (seed, B, M, H, W, dilations, iterations)
FP32_CASES = [
    (1, 1, 21, 13, 17, TOCO_DILATIONS, 10),
    (2, 1, 1, 19, 23, TOCO_DILATIONS, 10),
    (3, 2, 3, 11, 9, TOCO_DILATIONS, 1),
    (4, 2, 21, 9, 14, (1, 2), 3),
    (5, 2, 4, 16, 15, (3, 40), 2),
    (6, 1, 5, 7, 30, (1,), 10),
    (7, 2, 2, 12, 13, TOCO_DILATIONS, 0),
]


@pytest.mark.parametrize(
    ("seed", "batch", "classes", "height", "width", "dilations", "iterations"), FP32_CASES
)
def test_fp32_parity(seed, batch, classes, height, width, dilations, iterations):
    images, probs = make_inputs(seed, batch, classes, height, width)
    options = {"dilations": dilations, "iterations": iterations}
    refined = refine_pixel_adaptive(images, probs, backend="triton", **options)
    expected = reference.refine_pixel_adaptive(images, probs, **options)
    assert refined.shape == probs.shape and refined.dtype == torch.float32
    assert relative_error(refined, expected) <= 1e-5
    torch.testing.assert_close(refined, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("seed", "batch", "classes", "height", "width", "dilations", "iterations"), FP32_CASES
)
def test_torch_backend_parity(seed, batch, classes, height, width, dilations, iterations):
    """The batched plain-PyTorch CPU path computes what the reference computes."""
    images, probs = make_inputs(seed + 100, batch, classes, height, width)
    images, probs = images.cpu(), probs.cpu()
    options = {"dilations": dilations, "iterations": iterations}
    refined = refine_pixel_adaptive(images, probs, backend="torch", **options)
    expected = reference.refine_pixel_adaptive(images, probs, **options)
    assert refined.shape == probs.shape and refined.dtype == torch.float32
    torch.testing.assert_close(refined, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_backend_half_precision(dtype):
    images, probs = make_inputs(120, 2, 5, 14, 11, dtype=dtype)
    images, probs = images.cpu(), probs.cpu()
    refined = refine_pixel_adaptive(images, probs, backend="torch")
    expected = reference.refine_pixel_adaptive(images.float(), probs.float())
    assert refined.dtype == dtype
    assert relative_error(refined, expected) <= 8e-3


def test_reference_backend_is_the_reference():
    images, probs = make_inputs(8, 2, 3, 10, 12)
    refined = refine_pixel_adaptive(images, probs, iterations=2, backend="reference")
    assert torch.equal(refined, reference.refine_pixel_adaptive(images, probs, iterations=2))


def test_weights_and_flat_regions():
    """Other colour / position weights, and an image with flat patches: where every
    neighbour value is equal sigma is 0 and only the 1e-8 guard keeps a_k finite."""
    images, probs = make_inputs(9, 2, 3, 14, 11)
    images[0, :, :6, :7] = 0.5
    images[1, 1] = 0.25  # a constant channel
    options = {"dilations": (1, 3), "iterations": 4, "w_color": 0.5, "w_pos": 0.2}
    refined = refine_pixel_adaptive(images, probs, backend="triton", **options)
    expected = reference.refine_pixel_adaptive(images, probs, **options)
    assert torch.isfinite(refined).all()
    assert relative_error(refined, expected) <= 1e-5


def test_strided_inputs():
    """Channels-last images and maps that are a permuted (B, H, W, M) tensor."""
    images, probs = make_inputs(10, 2, 4, 13, 10)
    images = images.to(memory_format=torch.channels_last)
    probs = probs.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert not probs.is_contiguous()
    refined = refine_pixel_adaptive(images, probs, iterations=3, backend="triton")
    expected = reference.refine_pixel_adaptive(images, probs, iterations=3)
    assert refined.is_contiguous()
    assert relative_error(refined, expected) <= 1e-5


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 8e-3), (torch.float16, 1e-3)])
def test_half_precision_parity(dtype, tolerance):
    """Half-precision inputs against the reference in float32 on the same values: the
    fused op computes in float32 (intermediate steps included) and rounds the result."""
    images, probs = make_inputs(11 + (dtype == torch.float16), 2, 3, 12, 13, dtype=dtype)
    refined = refine_pixel_adaptive(images, probs, iterations=5, backend="triton")
    expected = reference.refine_pixel_adaptive(images.float(), probs.float(), iterations=5)
    assert refined.dtype == dtype
    assert relative_error(refined, expected) <= tolerance


def test_iterations_zero_returns_a_copy():
    images, probs = make_inputs(13, 1, 3, 8, 9)
    for backend in ("triton", "reference"):
        refined = refine_pixel_adaptive(images, probs, iterations=0, backend=backend)
        assert torch.equal(refined, probs)
        assert refined.data_ptr() != probs.data_ptr()


def test_no_gradient():
    """PAR makes pseudo-labels: inputs that require grad give a result that does not."""
    images, probs = make_inputs(14, 1, 3, 8, 9)
    images.requires_grad_()
    probs.requires_grad_()
    for backend in ("triton", "reference"):
        refined = refine_pixel_adaptive(images, probs, iterations=2, backend=backend)
        assert not refined.requires_grad


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_parity(dtype):
    """The compiled kernels at ToCo's shape (half of a 448 crop), 21 channels."""
    images, probs = make_inputs(15, 2, 21, 224, 224, dtype=dtype)
    refined = refine_pixel_adaptive(images, probs, backend="triton")
    expected = reference.refine_pixel_adaptive(images.float(), probs.float())
    assert relative_error(refined, expected) <= (1e-5 if dtype == torch.float32 else 8e-3)


def test_backend_choice(monkeypatch):
    images, probs = make_inputs(16, 1, 3, 9, 10)
    fused = torch.ops.wsss_fast.refine_pixel_adaptive(images, probs, [1, 2], 2, 0.3, 0.01)
    expected = reference.refine_pixel_adaptive(images, probs, dilations=(1, 2), iterations=2)
    options = {"dilations": (1, 2), "iterations": 2}
    monkeypatch.delenv("WSSS_FAST_BACKEND", raising=False)
    auto = refine_pixel_adaptive(images, probs, **options)  # Triton on CUDA, else torch
    if DEVICE.type == "cuda":
        assert torch.equal(auto, fused)
    else:
        torch.testing.assert_close(auto, expected, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("WSSS_FAST_BACKEND", "triton")
    assert torch.equal(refine_pixel_adaptive(images, probs, **options), fused)
    assert torch.equal(
        refine_pixel_adaptive(images, probs, backend="reference", **options), expected
    )
    monkeypatch.setenv("WSSS_FAST_BACKEND", "reference")
    assert torch.equal(refine_pixel_adaptive(images, probs, **options), expected)


def test_opcheck():
    images, probs = make_inputs(17, 1, 2, 8, 9)
    torch.library.opcheck(
        torch.ops.wsss_fast.refine_pixel_adaptive.default, (images, probs, [1, 3], 2, 0.3, 0.01)
    )


def test_torch_compile_matches_eager():
    images, probs = make_inputs(18, 1, 3, 8, 9)

    def refine_and_sharpen(images, probs):
        refined = refine_pixel_adaptive(
            images, probs, dilations=(1, 2), iterations=2, backend="triton"
        )
        return refined / refined.sum(dim=1, keepdim=True)

    compiled = torch.compile(refine_and_sharpen, fullgraph=True)
    torch.testing.assert_close(compiled(images, probs), refine_and_sharpen(images, probs))


def _bad(images_shape=(2, 3, 6, 7), probs_shape=(2, 4, 6, 7), **options):
    return torch.rand(images_shape), torch.rand(probs_shape), options


@pytest.mark.parametrize(
    ("images", "probs", "options", "argument"),
    [
        (*_bad(images_shape=(3, 6, 7)), "images"),
        (*_bad(images_shape=(2, 4, 6, 7)), "images"),
        (*_bad(probs_shape=(2, 6, 7)), "probs"),
        (*_bad(probs_shape=(3, 4, 6, 7)), "probs"),
        (*_bad(probs_shape=(2, 4, 6, 8)), "probs"),
        (*_bad(probs_shape=(2, 0, 6, 7)), "probs"),
        (torch.rand(2, 3, 6, 7, dtype=torch.float64), torch.rand(2, 4, 6, 7), {}, "images"),
        (torch.rand(2, 3, 6, 7), torch.zeros(2, 4, 6, 7, dtype=torch.long), {}, "probs"),
        (torch.rand(2, 3, 6, 7) * 255, torch.rand(2, 4, 6, 7), {"check_range": True}, "images"),
        (*_bad(dilations=()), "dilations"),
        (*_bad(dilations=(1, 0)), "dilations"),
        (*_bad(dilations=(1, -2)), "dilations"),
        (*_bad(dilations=(1, 2.0)), "dilations"),
        (*_bad(dilations=3), "dilations"),
        (*_bad(iterations=-1), "iterations"),
        (*_bad(iterations=2.5), "iterations"),
        (*_bad(w_color=0.0), "w_color"),
        (*_bad(w_color=float("inf")), "w_color"),
        (*_bad(w_pos=-0.1), "w_pos"),
        (*_bad(w_pos=float("nan")), "w_pos"),
        (*_bad(check_range=1), "check_range"),
        (*_bad(backend="compiled"), "backend"),
    ],
)
def test_bad_input_names_the_argument(images, probs, options, argument):
    with pytest.raises(ValueError, match=argument):
        refine_pixel_adaptive(images, probs, **options)


def test_range_check_accepts_images_in_range():
    images, probs = make_inputs(19, 1, 2, 6, 7)
    images[0, 0, 0, 0] = 1.0
    images[0, 1, 0, 0] = 0.0
    refined = refine_pixel_adaptive(images, probs, iterations=1, check_range=True)
    assert refined.shape == probs.shape
