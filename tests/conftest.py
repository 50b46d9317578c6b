"""Test-wide set-up.

Without a CUDA device the Triton kernels run through Triton's interpreter, which must
be switched on before triton is first imported: hence here, at the top of the suite.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(autouse=True)
def _fixed_default_seed():
    """Every test starts from a fresh generator state; tests that need other data seed it."""
    torch.manual_seed(0)
    yield
