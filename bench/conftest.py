"""Shared pieces of the benchmarks (`pytest bench --benchmark-only`)."""

import pytest
import torch


@pytest.fixture
def threads():
    """Sets torch's intra-op thread count for one benchmark and restores it afterwards."""
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)
