"""Measurement helpers shared by the benchmarks."""

import torch


def peak_extra_memory_mib(function) -> float:
    """Peak CUDA memory allocated while ``function`` runs, above what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    function()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20
