"""Loads the compiled extension and reports what it was built with."""

import torch

_BUILD_HINT = (
    "Build it from the repository root with\n"
    "    pip install --no-build-isolation -e .\n"
    "(--no-build-isolation compiles it against the torch installed here; set "
    "WSSS_FAST_CUDA=1 and CUDA_HOME to include the CUDA kernels). See README.md."
)


def load_compiled_extension():
    """Imports ``wsss_fast._C``, which registers the ``torch.ops.wsss_fast`` ops."""
    try:
        from wsss_fast import _C
    except ImportError as error:
        raise ImportError(
            "wsss_fast's compiled extension wsss_fast._C is missing or was built against "
            f"another torch than the installed {torch.__version__} ({error}).\n{_BUILD_HINT}"
        ) from error
    return _C


def has_cuda_kernels(op_name: str = "dense_crf_inference") -> bool:
    """True when the extension was built with CUDA kernels for ``wsss_fast::<op_name>``."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"wsss_fast::{op_name}", "CUDA")
