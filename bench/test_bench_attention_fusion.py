"""fuse_attention_maps: fused (Triton) against the reference, forward and forward+backward.

Shapes of performance.md: WeakTr's DeiT-S, 12 layers x 6 heads = 72 maps, Dh 64, with
N = 20 class tokens + 196 patches (224 crop) and 20 + 784 (448 crop), batch 64 on
GPU. Each group holds the fused and the reference case of one shape, dtype and mode
side by side; forward+backward asks for the gradients of q, k and the weights
(random upstream gradient). The
Triton cases need CUDA; the reference also runs on CPU, there in float32 on 2 images
and for 3 rounds. Peak memory above the inputs goes to ``extra_info`` on CUDA.
"""

import pytest
import torch

from bench.measure import time_fused_case, timed_device
from wsss_fast.ops import fuse_attention_maps

NUM_CLASSES = 20
SHAPES = [(64, 72, NUM_CLASSES + 196, 64), (64, 72, NUM_CLASSES + 784, 64)]
CPU_BATCH = 2
CPU_ROUNDS = 3


def make_inputs(shape, dtype, device):
    batch, maps, _, _ = shape
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(shape, generator=generator)
    k = torch.randn(shape, generator=generator)
    weights = torch.rand(batch, maps, generator=generator)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, weights))


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)))
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_fuse_attention_maps(benchmark, backend, shape, dtype, mode):
    device = timed_device(backend, dtype)
    on_cuda = device == "cuda"
    if not on_cuda:
        shape = (CPU_BATCH, *shape[1:])
    q, k, weights = make_inputs(shape, getattr(torch, dtype), device)
    synchronize = torch.cuda.synchronize if on_cuda else lambda: None

    if mode == "forward":

        def step():
            with torch.no_grad():
                fuse_attention_maps(q, k, weights, backend=backend)
            synchronize()

    else:
        for tensor in (q, k, weights):
            tensor.requires_grad_()
        upstream = torch.randn(q.shape[0], q.shape[2], q.shape[2], device=device).to(q.dtype)

        def step():
            fuse_attention_maps(q, k, weights, backend=backend).backward(upstream)
            q.grad = k.grad = weights.grad = None
            synchronize()

    time_fused_case(
        benchmark,
        step,
        group=f"fuse_attention_maps {mode} {'x'.join(map(str, shape))} {dtype} {device}",
        backend=backend,
        shape=shape,
        dtype=dtype,
        device=device,
        cpu_rounds=CPU_ROUNDS,
    )
