"""token_contrast_loss: fused (Triton; interpreted on CPU) against the ToCo-structured reference.

Every case draws fresh inputs from its own seed. Shapes stay small and odd: the
interpreter runs the kernels with 16-wide blocks, so N and D of 17-53 already cover
several row and column blocks, several k steps, two D slices and split columns.
"""

import pytest
import torch

from wsss_fast.ops import token_contrast_loss
from wsss_fast.reference import token_contrast as reference

IGNORE = 255
# The Triton kernels run on CUDA tensors, or interpreted on CPU tensors (tests/conftest.py).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_inputs(seed, batch, num_tokens, dim, ignored, num_classes, dtype=torch.float32):
    """Random tokens with a shared direction per class (so similarities spread over [-1, 1])
    and labels in [0, num_classes) with a fraction ``ignored`` set to IGNORE."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (batch, num_tokens), generator=generator)
    class_directions = torch.randn(num_classes, dim, generator=generator)
    tokens = class_directions[labels] + 1.5 * torch.randn(
        batch, num_tokens, dim, generator=generator
    )
    drop = torch.rand(batch, num_tokens, generator=generator) < ignored
    labels[drop] = IGNORE
    return tokens.to(device=DEVICE, dtype=dtype), labels.to(DEVICE)


def loss_and_grad(tokens, labels, upstream=1.0, **options):
    tokens = tokens.detach().clone().requires_grad_()
    loss = token_contrast_loss(tokens, labels, **options)
    (grad,) = torch.autograd.grad(loss * upstream, tokens)
    return loss.detach(), grad


def reference_loss_and_grad(tokens, labels, upstream=1.0, **options):
    tokens = tokens.detach().clone().requires_grad_()
    loss = reference.token_contrast_loss(tokens, labels, **options)
    (grad,) = torch.autograd.grad(loss * upstream, tokens)
    return loss.detach(), grad


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


# (seed, B, N, D, ignored fraction, classes, absolute, margin)
FP32_CASES = [
    (11, 2, 29, 37, 0.0, 3, True, 0.0),
    (12, 2, 29, 37, 0.3, 3, True, 0.0),
    (13, 3, 17, 53, 0.3, 4, True, 0.0),
    (14, 1, 45, 33, 0.3, 1, True, 0.0),
    (15, 2, 31, 19, 0.3, 3, False, 0.0),
    (16, 2, 31, 19, 0.3, 3, False, 0.25),
    (17, 2, 23, 41, 0.0, 1, False, 0.1),
    (18, 3, 19, 35, 0.3, 2, True, 0.3),
    (19, 2, 27, 29, 0.3, 3, False, -0.2),
]


@pytest.mark.parametrize(
    ("seed", "batch", "num_tokens", "dim", "ignored", "classes", "absolute", "margin"), FP32_CASES
)
def test_fp32_parity(seed, batch, num_tokens, dim, ignored, classes, absolute, margin):
    tokens, labels = make_inputs(seed, batch, num_tokens, dim, ignored, classes)
    options = {"absolute": absolute, "margin": margin}
    loss, grad = loss_and_grad(tokens, labels, upstream=1.7, backend="triton", **options)
    expected_loss, expected_grad = reference_loss_and_grad(tokens, labels, upstream=1.7, **options)
    assert loss.dtype == torch.float32
    assert relative_error(loss, expected_loss) <= 1e-4
    assert relative_error(grad, expected_grad) <= 1e-4
    assert torch.allclose(grad, expected_grad, rtol=1e-4, atol=1e-4 * expected_grad.abs().max())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    ("dtype", "loss_tolerance", "grad_tolerance"),
    [(torch.float32, 1e-4, 1e-4), (torch.bfloat16, 8e-3, 2e-2), (torch.float16, 1e-3, 3e-3)],
)
@pytest.mark.parametrize(("batch", "num_tokens", "dim"), [(2, 197, 768), (1, 785, 384)])
def test_cuda_parity(batch, num_tokens, dim, dtype, loss_tolerance, grad_tolerance):
    """The compiled kernels (tensor-core dots, GPU block sizes) at ViT shapes."""
    tokens, labels = make_inputs(num_tokens + dim, batch, num_tokens, dim, 0.3, 4, dtype=dtype)
    for absolute, margin in ((True, 0.0), (False, 0.1)):
        options = {"absolute": absolute, "margin": margin}
        loss, grad = loss_and_grad(tokens, labels, backend="triton", **options)
        expected_loss, expected_grad = reference_loss_and_grad(tokens.double(), labels, **options)
        assert relative_error(loss, expected_loss) <= loss_tolerance
        assert relative_error(grad, expected_grad) <= grad_tolerance


@pytest.mark.parametrize("absolute", [True, False])
def test_fully_ignored_batch_gives_half_and_zero_gradient(absolute):
    tokens, labels = make_inputs(21, 2, 23, 41, 1.0, 3)
    for backend in ("triton", "reference"):
        loss, grad = loss_and_grad(tokens, labels, backend=backend, absolute=absolute, margin=-0.5)
        assert loss.item() == 0.5
        assert torch.isfinite(grad).all()
        assert not grad.any()


def test_single_valid_token_has_no_pair():
    tokens, labels = make_inputs(22, 1, 18, 20, 0.0, 2)
    labels[:, 1:] = IGNORE
    loss, grad = loss_and_grad(tokens, labels, backend="triton")
    assert loss.item() == 0.5
    assert not grad.any()


@pytest.mark.parametrize("absolute", [True, False])
def test_zero_norm_tokens_match_reference(absolute):
    """Zero tokens normalise to zero (eps as F.normalize); the gradients stay finite and
    equal autograd's through F.normalize (divided by eps where the norm is below it)."""
    tokens, labels = make_inputs(23 + absolute, 2, 21, 26, 0.3, 2)
    tokens[0, 3] = 0.0
    tokens[1, [0, 7]] = 0.0
    labels[0, 3:5] = 1  # a zero token in a positive pair
    options = {"absolute": absolute, "margin": -0.1}
    loss, grad = loss_and_grad(tokens, labels, backend="triton", **options)
    expected_loss, expected_grad = reference_loss_and_grad(tokens, labels, **options)
    assert torch.isfinite(grad).all()
    assert relative_error(loss, expected_loss) <= 1e-4
    assert relative_error(grad, expected_grad) <= 1e-4


def test_strided_tokens_int32_labels_and_other_ignore_index():
    """ToCo's tokens come from a (B, D, H, W) map: a transposed view. ignore_index 0
    would collide with ToCo's relation codes; the reference marks ignored pairs apart."""
    generator = torch.Generator().manual_seed(31)
    feature_map = torch.randn(2, 27, 33, generator=generator).to(DEVICE)  # (B, D, N)
    tokens = feature_map.transpose(1, 2)  # (B, N, D), not contiguous
    labels = torch.randint(0, 4, (2, 33), generator=generator, dtype=torch.int32).to(DEVICE)
    options = {"ignore_index": 0, "absolute": False, "margin": 0.05}
    loss, grad = loss_and_grad(tokens, labels, backend="triton", **options)
    expected_loss, expected_grad = reference_loss_and_grad(tokens, labels.long(), **options)
    assert relative_error(loss, expected_loss) <= 1e-4
    assert relative_error(grad, expected_grad) <= 1e-4


@pytest.mark.parametrize(
    ("dtype", "loss_tolerance", "grad_tolerance"),
    [(torch.bfloat16, 8e-3, 2e-2), (torch.float16, 1e-3, 3e-3)],
)
@pytest.mark.parametrize("absolute", [True, False])
def test_half_precision_parity(dtype, loss_tolerance, grad_tolerance, absolute):
    """Half-precision tokens against the reference in float64 on the same values: the
    fused op computes in float32 and rounds only its results."""
    seed = 41 + 2 * (dtype == torch.float16) + absolute
    tokens, labels = make_inputs(seed, 2, 29, 37, 0.3, 3, dtype=dtype)
    options = {"absolute": absolute, "margin": 0.0 if absolute else 0.1}
    loss, grad = loss_and_grad(tokens, labels, backend="triton", **options)
    expected_loss, expected_grad = reference_loss_and_grad(tokens.double(), labels, **options)
    assert loss.dtype == dtype and grad.dtype == dtype
    assert relative_error(loss, expected_loss) <= loss_tolerance
    assert relative_error(grad, expected_grad) <= grad_tolerance


def test_deterministic():
    tokens, labels = make_inputs(51, 2, 29, 37, 0.3, 3)
    first = loss_and_grad(tokens, labels, backend="triton")
    second = loss_and_grad(tokens, labels, backend="triton")
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1], second[1])


def test_backend_choice(monkeypatch):
    tokens, labels = make_inputs(52, 1, 20, 24, 0.3, 3)
    fused, _, _ = torch.ops.wsss_fast.token_contrast_loss(tokens, labels, IGNORE, True, 0.0)
    expected = reference.token_contrast_loss(tokens, labels)
    monkeypatch.delenv("WSSS_FAST_BACKEND", raising=False)
    auto = token_contrast_loss(tokens, labels)  # Triton on CUDA tensors, else the reference
    assert torch.equal(auto, fused if DEVICE.type == "cuda" else expected)
    monkeypatch.setenv("WSSS_FAST_BACKEND", "triton")
    assert torch.equal(token_contrast_loss(tokens, labels), fused)
    assert torch.equal(token_contrast_loss(tokens, labels, backend="reference"), expected)
    monkeypatch.setenv("WSSS_FAST_BACKEND", "reference")
    assert torch.equal(token_contrast_loss(tokens, labels), expected)


def test_autocast_runs_the_fused_op_in_autocast_dtype():
    tokens, labels = make_inputs(53, 1, 20, 24, 0.3, 3)
    tokens.requires_grad_()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = token_contrast_loss(tokens, labels, backend="triton")
    loss.backward()
    assert loss.dtype == torch.bfloat16
    assert tokens.grad.dtype == torch.float32
    expected = reference.token_contrast_loss(tokens.detach().bfloat16().double(), labels)
    assert relative_error(loss, expected) <= 8e-3


def test_opcheck():
    tokens, labels = make_inputs(61, 1, 20, 24, 0.3, 3)
    tokens.requires_grad_()
    torch.library.opcheck(
        torch.ops.wsss_fast.token_contrast_loss.default, (tokens, labels, IGNORE, False, 0.1)
    )
    _, norms, pair_weights = torch.ops.wsss_fast.token_contrast_loss(
        tokens, labels, IGNORE, False, 0.1
    )
    grad_loss = torch.tensor(0.7, device=DEVICE)
    torch.library.opcheck(
        torch.ops.wsss_fast.token_contrast_loss_backward.default,
        (grad_loss, tokens.detach(), labels, norms, pair_weights, IGNORE, False, 0.1),
    )


def test_torch_compile_matches_eager():
    tokens, labels = make_inputs(62, 1, 20, 24, 0.3, 3)

    def weighted_loss(tokens, labels):
        return 0.2 * token_contrast_loss(tokens, labels, backend="triton")

    compiled = torch.compile(weighted_loss, fullgraph=True)
    results = []
    for function in (weighted_loss, compiled):
        leaf = tokens.clone().requires_grad_()
        loss = function(leaf, labels)
        results.append((loss, torch.autograd.grad(loss, leaf)[0]))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


@pytest.mark.parametrize(
    ("tokens", "labels", "options", "argument"),
    [
        (torch.randn(20, 8), torch.zeros(20, dtype=torch.long), {}, "tokens"),
        (
            torch.randn(2, 5, 8, dtype=torch.float64),
            torch.zeros(2, 5, dtype=torch.long),
            {},
            "tokens",
        ),
        (torch.randn(2, 0, 8), torch.zeros(2, 0, dtype=torch.long), {}, "tokens"),
        (torch.randn(2, 5, 8), torch.zeros(2, 5, 1, dtype=torch.long), {}, "labels"),
        (torch.randn(2, 5, 8), torch.zeros(3, 5, dtype=torch.long), {}, "labels"),
        (torch.randn(2, 5, 8), torch.zeros(2, 6, dtype=torch.long), {}, "labels"),
        (torch.randn(2, 5, 8), torch.zeros(2, 5), {}, "labels"),
        (
            torch.randn(2, 5, 8),
            torch.zeros(2, 5, dtype=torch.long),
            {"ignore_index": 2.5},
            "ignore_index",
        ),
        (torch.randn(2, 5, 8), torch.zeros(2, 5, dtype=torch.long), {"absolute": 1}, "absolute"),
        (
            torch.randn(2, 5, 8),
            torch.zeros(2, 5, dtype=torch.long),
            {"margin": float("nan")},
            "margin",
        ),
        (torch.randn(2, 5, 8), torch.zeros(2, 5, dtype=torch.long), {"backend": "cuda"}, "backend"),
    ],
)
def test_bad_input_names_the_argument(tokens, labels, options, argument):
    with pytest.raises(ValueError, match=argument):
        token_contrast_loss(tokens, labels, **options)
