"""refine_pixel_adaptive: fused (Triton) against the ToCo-structured reference.

Shape of performance.md: ToCo's PAR at half of a 448 crop, (4, 21, 224, 224), the 48
neighbours of dilations (1, 2, 4, 8, 12, 24), 10 iterations, float32. The fused and
the reference case sit side by side in one group. The Triton case needs CUDA (the
interpreter says nothing about speed); the reference also runs on CPU, there on one
image (it takes seconds per image) and for 3 rounds. Peak memory above the inputs
goes to ``extra_info`` on CUDA.
"""

import pytest
import torch

from bench.measure import time_fused_case, timed_device
from wsss_fast.ops import refine_pixel_adaptive

SHAPE = (4, 21, 224, 224)
CPU_BATCH = 1
CPU_ROUNDS = 3


def make_inputs(shape, device):
    batch, _, height, width = shape
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(batch, 3, height // 8, width // 8, generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")
    probs = (3.0 * torch.randn(shape, generator=generator)).softmax(dim=1)
    return images.to(device), probs.to(device)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_refine_pixel_adaptive(benchmark, backend):
    device = timed_device(backend)
    on_cuda = device == "cuda"
    shape = SHAPE if on_cuda else (CPU_BATCH, *SHAPE[1:])
    images, probs = make_inputs(shape, device)
    synchronize = torch.cuda.synchronize if on_cuda else lambda: None

    def step():
        refine_pixel_adaptive(images, probs, backend=backend)
        synchronize()

    time_fused_case(
        benchmark,
        step,
        group=f"refine_pixel_adaptive {'x'.join(map(str, shape))} K=48 10 it {device}",
        backend=backend,
        shape=shape,
        dtype="float32",
        device=device,
        cpu_rounds=CPU_ROUNDS,
    )
