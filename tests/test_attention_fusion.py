"""fuse_attention_maps: fused (Triton; interpreted on CPU) against the WeakTr-structured reference.

Every case draws fresh inputs from its own seed. The interpreter runs the kernels with
16-wide row and column blocks below N = 128, so N of 17-53 already covers several
blocks and partial ones; head dimensions below 16 or off a power of two are padded.
"""

import pytest
import torch

from wsss_fast.ops import fuse_attention_maps
from wsss_fast.reference import attention_fusion as reference

# The Triton kernels run on CUDA tensors, or interpreted on CPU tensors (tests/conftest.py).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_inputs(seed, batch, maps, num_tokens, head_dim, dtype=torch.float32):
    """Queries and keys with a spread of attention sharpness (logits of a few units),
    weights in (0, 1) as AAF's sigmoid gives, and an upstream gradient."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, maps, num_tokens, head_dim)
    q = 2.0 * torch.randn(shape, generator=generator)
    k = torch.randn(shape, generator=generator)
    weights = torch.rand(batch, maps, generator=generator)
    upstream = torch.randn(batch, num_tokens, num_tokens, generator=generator)
    return tuple(t.to(DEVICE, dtype) for t in (q, k, weights, upstream))


def fused_and_grads(q, k, weights, upstream, function=fuse_attention_maps, **options):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, weights)]
    fused = function(*leaves, **options)
    grads = torch.autograd.grad(fused, leaves, upstream)
    return fused.detach(), *grads


def reference_fused_and_grads(q, k, weights, upstream, **options):
    return fused_and_grads(
        q, k, weights, upstream, function=reference.fuse_attention_maps, **options
    )


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_parity(actual, expected, tolerances):
    for name, value, wanted, tolerance in zip(
        ("fused", "grad q", "grad k", "grad weights"), actual, expected, tolerances, strict=True
    ):
        error = relative_error(value, wanted)
        assert error <= tolerance, f"{name}: relative error {error:.2e} > {tolerance:.0e}"


# (seed, B, G, N, Dh, scale)
FP32_CASES = [
    (1, 2, 6, 23, 16, None),
    (2, 1, 4, 37, 24, None),
    (3, 2, 3, 17, 64, None),
    (4, 1, 72, 20, 8, None),
    (5, 2, 2, 53, 32, 0.35),
    (6, 1, 3, 16, 40, None),
]


@pytest.mark.parametrize(("seed", "batch", "maps", "num_tokens", "head_dim", "scale"), FP32_CASES)
def test_fp32_parity(seed, batch, maps, num_tokens, head_dim, scale):
    q, k, weights, upstream = make_inputs(seed, batch, maps, num_tokens, head_dim)
    actual = fused_and_grads(q, k, weights, upstream, scale=scale, backend="triton")
    expected = reference_fused_and_grads(q, k, weights, upstream, scale=scale)
    assert actual[0].shape == (batch, num_tokens, num_tokens)
    assert_parity(actual, expected, (1e-4, 1e-3, 1e-3, 1e-3))
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-4, atol=1e-6)


def test_reference_backend_is_the_reference():
    q, k, weights, upstream = make_inputs(7, 2, 3, 19, 16)
    actual = fused_and_grads(q, k, weights, upstream, backend="reference")
    expected = reference_fused_and_grads(q, k, weights, upstream)
    for value, wanted in zip(actual, expected, strict=True):
        assert torch.equal(value, wanted)


def test_vit_token_count_804():
    """WeakTr at a 448 crop: 20 class tokens + 784 patches, Dh 64 (one map: the
    interpreter is slow; the kernels loop over the maps the same way for 72)."""
    q, k, weights, upstream = make_inputs(8, 1, 1, 804, 64)
    actual = fused_and_grads(q, k, weights, upstream, backend="triton")
    expected = reference_fused_and_grads(q, k, weights, upstream)
    assert_parity(actual, expected, (1e-4, 1e-3, 1e-3, 1e-3))


def test_single_token_has_constant_map():
    """N = 1: every map is [[1]], so the fused map is mean(weights) and q, k get no gradient."""
    q, k, weights, upstream = make_inputs(9, 2, 3, 1, 16)
    fused, grad_q, grad_k, grad_weights = fused_and_grads(q, k, weights, upstream, backend="triton")
    torch.testing.assert_close(fused[:, 0, 0], weights.mean(dim=1))
    assert not grad_q.any() and not grad_k.any()
    torch.testing.assert_close(grad_weights, upstream[:, 0, 0, None].expand(-1, 3) / 3)


def test_sum_gives_no_query_key_gradient():
    """Rows of every map sum to 1, so the sum of the fused map is sum(weights) * N / G:
    q and k get (almost) no gradient, the weights N / G each. The upstream of a sum is
    an expanded (stride 0) tensor, which the kernels read through its strides."""
    q, k, weights, _ = make_inputs(10, 2, 4, 29, 16)
    leaves = [t.clone().requires_grad_() for t in (q, k, weights)]
    fuse_attention_maps(*leaves, backend="triton").sum().backward()
    assert leaves[0].grad.abs().max() <= 1e-5
    assert leaves[1].grad.abs().max() <= 1e-5
    torch.testing.assert_close(leaves[2].grad, torch.full_like(weights, 29 / 4))


def test_weights_only_gradient():
    """WeakTr detaches the maps: only the weights get a gradient (the single-pass
    backward), and it matches the reference."""
    q, k, weights, upstream = make_inputs(11, 2, 5, 21, 16)
    leaf = weights.clone().requires_grad_()
    (grad,) = torch.autograd.grad(fuse_attention_maps(q, k, leaf, backend="triton"), leaf, upstream)
    expected = reference_fused_and_grads(q, k, weights, upstream)[3]
    assert relative_error(grad, expected) <= 1e-4


def test_strided_inputs():
    """Queries and keys as views of timm's fused qkv projection (B, N, 3, G, Dh), and
    transposed weights."""
    generator = torch.Generator().manual_seed(12)
    qkv = torch.randn(2, 25, 3, 4, 16, generator=generator).to(DEVICE)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # (B, G, N, Dh) views
    weights = torch.rand(4, 2, generator=generator).to(DEVICE).t()
    upstream = torch.randn(2, 25, 25, generator=generator).to(DEVICE)
    assert not q.is_contiguous() and not weights.is_contiguous()
    actual = fused_and_grads(q, k, weights, upstream, backend="triton")
    expected = reference_fused_and_grads(q, k, weights, upstream)
    assert_parity(actual, expected, (1e-4, 1e-3, 1e-3, 1e-3))


@pytest.mark.parametrize(
    ("dtype", "tolerances"),
    [
        (torch.bfloat16, (8e-3, 2e-2, 2e-2, 8e-3)),
        (torch.float16, (1e-3, 3e-3, 3e-3, 1e-3)),
    ],
)
def test_half_precision_parity(dtype, tolerances):
    """Half-precision inputs against the reference in float64 on the same values: the
    fused op computes in float32 and rounds only its results."""
    q, k, weights, upstream = make_inputs(13 + (dtype == torch.float16), 2, 3, 29, 32, dtype)
    actual = fused_and_grads(q, k, weights, upstream, backend="triton")
    expected = reference_fused_and_grads(
        q.double(), k.double(), weights.double(), upstream.double()
    )
    assert all(value.dtype == dtype for value in actual)
    assert_parity(actual, expected, tolerances)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    ("dtype", "tolerances"),
    [
        (torch.float32, (1e-4, 1e-3, 1e-3, 1e-3)),
        (torch.bfloat16, (8e-3, 2e-2, 2e-2, 8e-3)),
        (torch.float16, (1e-3, 3e-3, 3e-3, 1e-3)),
    ],
)
@pytest.mark.parametrize("num_tokens", [216, 804])
def test_cuda_parity(num_tokens, dtype, tolerances):
    """The compiled kernels (tensor-core dots, GPU block sizes) at WeakTr's shapes."""
    q, k, weights, upstream = make_inputs(num_tokens, 2, 72, num_tokens, 64, dtype)
    actual = fused_and_grads(q, k, weights, upstream, backend="triton")
    expected = reference_fused_and_grads(
        q.double(), k.double(), weights.double(), upstream.double()
    )
    assert_parity(actual, expected, tolerances)


def test_backend_choice(monkeypatch):
    q, k, weights, _ = make_inputs(15, 1, 3, 18, 16)
    fused, _ = torch.ops.wsss_fast.fuse_attention_maps(q, k, weights, 0.25)
    expected = reference.fuse_attention_maps(q, k, weights)
    monkeypatch.delenv("WSSS_FAST_BACKEND", raising=False)
    auto = fuse_attention_maps(q, k, weights)  # Triton on CUDA tensors, else the reference
    assert torch.equal(auto, fused if DEVICE.type == "cuda" else expected)
    monkeypatch.setenv("WSSS_FAST_BACKEND", "triton")
    assert torch.equal(fuse_attention_maps(q, k, weights), fused)
    assert torch.equal(fuse_attention_maps(q, k, weights, backend="reference"), expected)
    monkeypatch.setenv("WSSS_FAST_BACKEND", "reference")
    assert torch.equal(fuse_attention_maps(q, k, weights), expected)


def test_autocast_runs_the_fused_op_in_autocast_dtype():
    q, k, weights, _ = make_inputs(16, 1, 3, 18, 16)
    leaves = [t.clone().requires_grad_() for t in (q, k, weights)]
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        fused = fuse_attention_maps(*leaves, backend="triton")
    fused.float().sum().backward()
    assert fused.dtype == torch.bfloat16
    assert all(leaf.grad.dtype == torch.float32 for leaf in leaves)
    expected = reference.fuse_attention_maps(
        q.bfloat16().double(), k.bfloat16().double(), weights.double()
    )
    assert relative_error(fused, expected) <= 8e-3


def test_opcheck():
    q, k, weights, upstream = make_inputs(17, 1, 2, 18, 16)
    inputs = [t.clone().requires_grad_() for t in (q, k, weights)]
    torch.library.opcheck(torch.ops.wsss_fast.fuse_attention_maps.default, (*inputs, 0.25))
    _, lse = torch.ops.wsss_fast.fuse_attention_maps(q, k, weights, 0.25)
    torch.library.opcheck(
        torch.ops.wsss_fast.fuse_attention_maps_row_dots.default, (upstream, q, k, lse, 0.25)
    )
    row_dots = torch.ops.wsss_fast.fuse_attention_maps_row_dots(upstream, q, k, lse, 0.25)
    torch.library.opcheck(
        torch.ops.wsss_fast.fuse_attention_maps_backward.default,
        (upstream, q, k, weights, lse, row_dots, 0.25),
    )


def test_torch_compile_matches_eager():
    q, k, weights, upstream = make_inputs(18, 1, 2, 18, 16)

    def cross_attention(q, k, weights):
        fused = fuse_attention_maps(q, k, weights, backend="triton")
        return fused[:, :4, 4:] * 2.0

    compiled = torch.compile(cross_attention, fullgraph=True)
    results = [
        fused_and_grads(q, k, weights, upstream[:, :4, 4:], function=function)
        for function in (cross_attention, compiled)
    ]
    for value, wanted in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(value, wanted)


def _bad(q_shape=(2, 3, 5, 8), k_shape=None, weights_shape=(2, 3), dtype=torch.float32):
    q = torch.randn(q_shape, dtype=dtype)
    k = torch.randn(q_shape if k_shape is None else k_shape, dtype=dtype)
    return q, k, torch.rand(weights_shape)


@pytest.mark.parametrize(
    ("inputs", "options", "argument"),
    [
        (_bad(q_shape=(3, 5, 8), weights_shape=(3, 5)), {}, "q"),
        (_bad(q_shape=(2, 3, 0, 8)), {}, "q"),
        (_bad(dtype=torch.float64), {}, "q"),
        (_bad(k_shape=(2, 3, 6, 8)), {}, "k"),
        (_bad(k_shape=(2, 3, 5, 4)), {}, "k"),
        ((torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8).half(), torch.rand(2, 3)), {}, "k"),
        (_bad(weights_shape=(2, 4)), {}, "weights"),
        (_bad(weights_shape=(2, 3, 1)), {}, "weights"),
        (
            (torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8), torch.ones(2, 3).long()),
            {},
            "weights",
        ),
        (_bad(), {"scale": float("nan")}, "scale"),
        (_bad(), {"scale": "0.1"}, "scale"),
        (_bad(), {"backend": "compiled"}, "backend"),
        (_bad(q_shape=(1, 1, 4, 257), weights_shape=(1, 1)), {"backend": "triton"}, "q"),
    ],
)
def test_bad_input_names_the_argument(inputs, options, argument):
    with pytest.raises(ValueError, match=argument):
        fuse_attention_maps(*inputs, **options)
