"""token_contrast_loss: fused (Triton) against the reference, forward and forward+backward.

Shapes of performance.md: ToCo's final tokens for a 448 crop (4, 784, 768) and a 672 crop
(4, 1764, 768), about 30% ignored tokens. Each group holds the fused and the reference
case of one shape, dtype and mode side by side. The Triton cases need CUDA (the
interpreter says nothing about speed); the reference cases also run on CPU (float32).
Peak memory above the inputs goes to ``extra_info`` on CUDA.
"""

import pytest
import torch

from bench.measure import time_fused_case, timed_device
from wsss_fast.ops import token_contrast_loss

SHAPES = [(4, 784, 768), (4, 1764, 768)]
IGNORE = 255


def make_inputs(shape, dtype, device):
    batch, num_tokens, dim = shape
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (batch, num_tokens), generator=generator)
    labels[torch.rand(batch, num_tokens, generator=generator) < 0.3] = IGNORE
    tokens = torch.randn(batch, num_tokens, dim, generator=generator)
    return tokens.to(device=device, dtype=dtype), labels.to(device)


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)))
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_token_contrast_loss(benchmark, backend, shape, dtype, mode):
    device = timed_device(backend, dtype)
    on_cuda = device == "cuda"
    tokens, labels = make_inputs(shape, getattr(torch, dtype), device)
    synchronize = torch.cuda.synchronize if on_cuda else lambda: None

    if mode == "forward":

        def step():
            with torch.no_grad():
                token_contrast_loss(tokens, labels, backend=backend)
            synchronize()

    else:
        tokens.requires_grad_()

        def step():
            token_contrast_loss(tokens, labels, backend=backend).backward()
            tokens.grad = None
            synchronize()

    time_fused_case(
        benchmark,
        step,
        group=f"token_contrast_loss {mode} {'x'.join(map(str, shape))} {dtype} {device}",
        backend=backend,
        shape=shape,
        dtype=dtype,
        device=device,
    )
