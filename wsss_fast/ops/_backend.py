"""The one place where an op's backend is chosen.

Backends:
- ``triton``: fused Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).
- ``compiled``: the C++ / CUDA extension ``wsss_fast._C``.
- ``torch``: batched plain PyTorch without Python loops over images, for ops whose
  reference is too slow to train with on a CPU and that have no compiled kernel.
- ``reference``: the plain-PyTorch / numpy implementations of ``wsss_fast.reference``.
- ``auto`` picks the fastest one the op has for the tensor's device.

The ``backend=`` argument of an op wins over the ``WSSS_FAST_BACKEND`` environment
variable. An argument naming a backend the op lacks is an error; the environment
variable applies to every op, so an op without that backend falls back to ``auto``.
"""

import os

import torch

BACKENDS = ("auto", "triton", "compiled", "torch", "reference")
BACKEND_ENV_VAR = "WSSS_FAST_BACKEND"


def _triton_runs_on(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors under its interpreter."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _auto(device: torch.device, supported: tuple[str, ...]) -> str:
    if device.type == "cuda" and "triton" in supported:
        return "triton"
    for backend in ("compiled", "torch"):
        if backend in supported:
            return backend
    return "reference"


def resolve_backend(
    op_name: str, device: torch.device, supported: tuple[str, ...], requested: str | None = None
) -> str:
    """Returns the backend that runs ``op_name`` on ``device``.

    ``supported`` lists the concrete backends the op implements, ``requested`` is the
    op's ``backend=`` argument (None: the environment variable, else ``auto``).
    """
    from_argument = requested is not None
    choice = requested if from_argument else os.environ.get(BACKEND_ENV_VAR, "auto")
    choice = choice.strip().lower()
    if choice not in BACKENDS:
        source = "backend" if from_argument else BACKEND_ENV_VAR
        raise ValueError(f"{source} must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        return _auto(device, supported)
    if choice not in supported:
        if from_argument:
            raise ValueError(
                f"backend={choice!r} is not available for {op_name}; it supports "
                f"{('auto', *supported)}"
            )
        return _auto(device, supported)
    if choice == "triton" and not _triton_runs_on(device):
        if from_argument:
            raise ValueError(
                f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton "
                f"is imported to run on {device.type} tensors; got {op_name} on {device}"
            )
        return _auto(device, supported)
    return choice
