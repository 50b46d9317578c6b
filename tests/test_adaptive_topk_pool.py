"""adaptive_topk_pool: fused (Triton; interpreted on CPU) against the sort-based reference.

Every case draws fresh inputs from its own seed. The selection is exact (order keys,
not floating-point sums), so gradients must agree exactly, ties included.
"""

import pytest
import torch

from wsss_fast.ops import adaptive_topk_pool
from wsss_fast.reference import adaptive_topk_pool as reference

# The Triton kernels run on CUDA tensors, or interpreted on CPU tensors (tests/conftest.py).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def patch_probabilities(seed, batch, classes, num_tokens, dtype=torch.float32):
    """(B, C, N) softmax-over-classes scores, as a patch classifier gives."""
    generator = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(batch, classes, num_tokens, generator=generator)
    return logits.softmax(dim=1).to(device=DEVICE, dtype=dtype)


def tied_scores(seed, batch, classes, num_tokens):
    """Scores on a coarse grid: many ties, at the maximum and at the k-th largest value,
    a row of zeros and a -0.0 among them."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 5, (batch, classes, num_tokens), generator=generator) / 4.0
    scores[0, 0] = 0.0
    scores[0, 0, 3] = -0.0
    return scores.to(DEVICE)


def pool_and_grad(scores, upstream, **options):
    scores = scores.detach().clone().requires_grad_()
    pooled = adaptive_topk_pool(scores, **options)
    (grad,) = torch.autograd.grad(pooled, scores, upstream)
    return pooled.detach(), grad


def reference_pool_and_grad(scores, upstream, **options):
    scores = scores.detach().clone().requires_grad_()
    pooled = reference.adaptive_topk_pool(scores, **options)
    (grad,) = torch.autograd.grad(pooled, scores, upstream)
    return pooled.detach(), grad


def upstream_for(seed, pooled_shape, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(pooled_shape, generator=generator).to(device=DEVICE, dtype=dtype)


# (seed, B, C, N, gamma, k_max)
FP32_CASES = [
    (1, 2, 5, 37, 0.5, None),
    (2, 2, 5, 37, 0.5, 4),
    (3, 3, 4, 29, 0.0, 7),
    (4, 2, 5, 37, 1.0, None),
    (5, 2, 3, 37, 1.7, None),
    (6, 1, 21, 577, 0.5, 144),
    (7, 2, 3, 33, 0.0, 100),
    (8, 2, 3, 1, 0.5, None),
    (9, 2, 4, 19, 0.2, 1),
]


@pytest.mark.parametrize(("seed", "batch", "classes", "num_tokens", "gamma", "k_max"), FP32_CASES)
def test_fp32_parity(seed, batch, classes, num_tokens, gamma, k_max):
    scores = patch_probabilities(seed, batch, classes, num_tokens)
    upstream = upstream_for(seed, (batch, classes))
    options = {"gamma": gamma, "k_max": k_max}
    pooled, grad = pool_and_grad(scores, upstream, backend="triton", **options)
    expected_pooled, expected_grad = reference_pool_and_grad(scores, upstream, **options)
    torch.testing.assert_close(pooled, expected_pooled, rtol=1e-6, atol=1e-7)
    assert torch.equal(grad, expected_grad)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("gamma", "k_max"), [(0.5, 144), (0.0, 16), (1.0, None)])
def test_cuda_parity(gamma, k_max):
    """The compiled kernels at APC's shape, ties included."""
    scores = torch.cat([patch_probabilities(19, 16, 21, 576), tied_scores(20, 16, 21, 576)])
    upstream = upstream_for(19, (32, 21))
    options = {"gamma": gamma, "k_max": k_max}
    pooled, grad = pool_and_grad(scores, upstream, backend="triton", **options)
    expected_pooled, expected_grad = reference_pool_and_grad(scores, upstream, **options)
    torch.testing.assert_close(pooled, expected_pooled, rtol=1e-6, atol=1e-7)
    assert torch.equal(grad, expected_grad)


@pytest.mark.parametrize(("gamma", "k_max"), [(0.5, None), (0.5, 3), (0.0, 6), (1.0, None)])
def test_ties_select_the_lowest_indices(gamma, k_max):
    scores = tied_scores(11, 2, 4, 23)
    upstream = upstream_for(11, (2, 4))
    options = {"gamma": gamma, "k_max": k_max}
    pooled, grad = pool_and_grad(scores, upstream, backend="triton", **options)
    expected_pooled, expected_grad = reference_pool_and_grad(scores, upstream, **options)
    torch.testing.assert_close(pooled, expected_pooled, rtol=1e-6, atol=1e-7)
    assert torch.equal(grad, expected_grad)


def test_special_cases_max_pooling_and_fixed_top_k():
    scores = patch_probabilities(12, 2, 5, 41)
    max_pooled = adaptive_topk_pool(scores, gamma=1.0, backend="triton")
    assert torch.equal(max_pooled, scores.amax(dim=-1))
    top_k = adaptive_topk_pool(scores, gamma=0.0, k_max=6, backend="triton")
    torch.testing.assert_close(top_k, scores.topk(6, dim=-1).values.mean(dim=-1))


def test_signed_scores_keep_their_order():
    """Non-negative scores are the use case, but the order keys are exact for any finite
    float, so the fused op still agrees with the reference on signed scores."""
    generator = torch.Generator().manual_seed(13)
    scores = torch.randn(2, 3, 31, generator=generator).to(DEVICE)
    upstream = upstream_for(13, (2, 3))
    for gamma, k_max in ((0.5, None), (0.0, 5)):
        pooled, grad = pool_and_grad(scores, upstream, backend="triton", gamma=gamma, k_max=k_max)
        expected = reference_pool_and_grad(scores, upstream, gamma=gamma, k_max=k_max)
        torch.testing.assert_close(pooled, expected[0], rtol=1e-6, atol=1e-7)
        assert torch.equal(grad, expected[1])


def test_strided_scores():
    """Patch classifiers give (B, N, C): pooling its transposed view needs no copy."""
    scores = patch_probabilities(14, 2, 7, 45).transpose(1, 2).contiguous().transpose(1, 2)
    assert not scores.is_contiguous()
    upstream = upstream_for(14, (2, 7))
    pooled, grad = pool_and_grad(scores, upstream, backend="triton", k_max=9)
    expected_pooled, expected_grad = reference_pool_and_grad(scores, upstream, k_max=9)
    torch.testing.assert_close(pooled, expected_pooled, rtol=1e-6, atol=1e-7)
    assert torch.equal(grad, expected_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parity(dtype):
    """Both sides select in float32 on the same values and round the mean once."""
    seed = 15 + (dtype == torch.float16)
    scores = patch_probabilities(seed, 2, 5, 37, dtype=dtype)
    upstream = upstream_for(seed, (2, 5), dtype=dtype)
    pooled, grad = pool_and_grad(scores, upstream, backend="triton", k_max=6)
    expected_pooled, expected_grad = reference_pool_and_grad(scores, upstream, k_max=6)
    assert pooled.dtype == dtype and grad.dtype == dtype
    tolerance = {"rtol": 1e-2, "atol": 1e-3} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(pooled, expected_pooled, **tolerance)
    torch.testing.assert_close(grad, expected_grad, **tolerance)


def test_backend_choice(monkeypatch):
    scores = patch_probabilities(16, 2, 3, 25)
    fused, _, _ = torch.ops.wsss_fast.adaptive_topk_pool(scores, 0.5, 25)
    expected = reference.adaptive_topk_pool(scores)
    monkeypatch.delenv("WSSS_FAST_BACKEND", raising=False)
    auto = adaptive_topk_pool(scores)  # Triton on CUDA tensors, else the reference
    assert torch.equal(auto, fused if DEVICE.type == "cuda" else expected)
    monkeypatch.setenv("WSSS_FAST_BACKEND", "triton")
    assert torch.equal(adaptive_topk_pool(scores), fused)
    assert torch.equal(adaptive_topk_pool(scores, backend="reference"), expected)
    monkeypatch.setenv("WSSS_FAST_BACKEND", "reference")
    assert torch.equal(adaptive_topk_pool(scores), expected)


def test_opcheck():
    scores = patch_probabilities(17, 2, 3, 19).requires_grad_()
    torch.library.opcheck(torch.ops.wsss_fast.adaptive_topk_pool.default, (scores, 0.5, 5))
    _, kth_value, k = torch.ops.wsss_fast.adaptive_topk_pool(scores, 0.5, 5)
    upstream = upstream_for(17, (2, 3))
    torch.library.opcheck(
        torch.ops.wsss_fast.adaptive_topk_pool_backward.default,
        (upstream, scores.detach(), kth_value, k),
    )


def test_torch_compile_matches_eager():
    scores = patch_probabilities(18, 2, 3, 19)

    def image_scores(scores):
        return adaptive_topk_pool(scores, gamma=0.5, k_max=5, backend="triton").clamp(0, 1)

    compiled = torch.compile(image_scores, fullgraph=True)
    results = []
    for function in (image_scores, compiled):
        leaf = scores.clone().requires_grad_()
        pooled = function(leaf)
        results.append((pooled, torch.autograd.grad(pooled.sum(), leaf)[0]))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


@pytest.mark.parametrize(
    ("scores", "options", "argument"),
    [
        (torch.rand(4, 9), {}, "scores"),
        (torch.rand(2, 3, 0), {}, "scores"),
        (torch.randint(0, 3, (2, 3, 9)), {}, "scores"),
        (torch.rand(2, 3, 9), {"gamma": -0.1}, "gamma"),
        (torch.rand(2, 3, 9), {"gamma": float("nan")}, "gamma"),
        (torch.rand(2, 3, 9), {"k_max": -2}, "k_max"),
        (torch.rand(2, 3, 9), {"k_max": 0}, "k_max"),
        (torch.rand(2, 3, 9), {"k_max": 2.5}, "k_max"),
        (torch.rand(2, 3, 9), {"backend": "compiled"}, "backend"),
        (torch.rand(1, 1, 65537), {"backend": "triton"}, "scores"),
    ],
)
def test_bad_input_names_the_argument(scores, options, argument):
    with pytest.raises(ValueError, match=argument):
        adaptive_topk_pool(scores, **options)
