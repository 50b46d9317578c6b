"""adaptive_topk_pool: fused (Triton) against the reference, forward and forward+backward.

Shape of performance.md: APC's patch scores (16, 21, 576) for a 384 crop, softmax
probabilities, gamma 0.5, k_max = N / 4. Each group holds the fused and the reference
case side by side. The Triton cases need CUDA; the reference cases also run on CPU.
Peak memory above the inputs goes to ``extra_info`` on CUDA.
"""

import pytest
import torch

from bench.measure import time_fused_case, timed_device
from wsss_fast.ops import adaptive_topk_pool

SHAPE = (16, 21, 576)
GAMMA = 0.5
K_MAX = SHAPE[2] // 4


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_adaptive_topk_pool(benchmark, backend, mode):
    device = timed_device(backend)
    on_cuda = device == "cuda"
    generator = torch.Generator().manual_seed(0)
    scores = (3.0 * torch.randn(SHAPE, generator=generator)).softmax(dim=1).to(device)
    synchronize = torch.cuda.synchronize if on_cuda else lambda: None

    if mode == "forward":

        def step():
            with torch.no_grad():
                adaptive_topk_pool(scores, gamma=GAMMA, k_max=K_MAX, backend=backend)
            synchronize()

    else:
        scores.requires_grad_()

        def step():
            adaptive_topk_pool(scores, gamma=GAMMA, k_max=K_MAX, backend=backend).sum().backward()
            scores.grad = None
            synchronize()

    time_fused_case(
        benchmark,
        step,
        group=f"adaptive_topk_pool {mode} {'x'.join(map(str, SHAPE))} float32 {device}",
        backend=backend,
        shape=SHAPE,
        dtype="float32",
        device=device,
    )
