"""Measurement helpers shared by the benchmarks."""

import pytest
import torch


def timed_device(backend: str, dtype: str = "float32") -> str:
    """The device a fused-vs-reference case runs on: CUDA when there is one.

    Without CUDA the Triton and bfloat16 cases are skipped: the interpreter and CPU
    bfloat16 say nothing about GPU speed.
    """
    if torch.cuda.is_available():
        return "cuda"
    if backend == "triton":
        pytest.skip("the Triton kernels are timed on CUDA only")
    if dtype == "bfloat16":
        pytest.skip("bfloat16 is timed on CUDA only")
    return "cpu"


def peak_extra_memory_mib(function) -> float:
    """Peak CUDA memory allocated while ``function`` runs, above what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    function()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def time_fused_case(
    benchmark, step, *, group, backend, shape, dtype, device, cpu_rounds=None
) -> None:
    """Times ``step`` as one case of a fused-vs-reference group.

    Records what ran in ``extra_info``; warms up first (Triton compilation, allocator
    caches) and, on CUDA, records the peak extra memory. On CPU, ``cpu_rounds`` bounds a
    slow reference case to that many timed rounds.
    """
    benchmark.group = group
    benchmark.extra_info.update(
        backend=backend,
        shape=list(shape),
        dtype=dtype,
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
    )
    if device != "cuda" and cpu_rounds is not None:
        benchmark.pedantic(step, rounds=cpu_rounds, iterations=1)
        return
    step()
    if device == "cuda":
        benchmark.extra_info["peak_extra_memory_mib"] = peak_extra_memory_mib(step)
    benchmark(step)
