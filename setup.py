"""Builds the compiled extension ``wsss_fast._C``.

The C++ CPU part is always built. The CUDA part is built when CUDA is usable or when
``WSSS_FAST_CUDA=1`` is set (with ``CUDA_HOME`` pointing at a toolkit, this compiles and
links on a machine without a GPU). ``WSSS_FAST_CUDA=0`` forces a CPU-only build.
``WSSS_FAST_PORTABLE=1`` drops ``-march=native`` for binaries that move between machines.

Build against the installed torch: ``pip install --no-build-isolation -e .``
"""

import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("WSSS_FAST_CUDA", "").strip().lower()
    if flag in ("1", "true", "yes", "on"):
        return True
    if flag in ("0", "false", "no", "off"):
        return False
    import torch

    return torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None


def _default_cuda_arch() -> None:
    """Picks Hopper (sm_90) when no GPU is visible and TORCH_CUDA_ARCH_LIST is unset.

    torch derives the target architectures from the visible GPUs; with none (a CPU
    machine compiling the CUDA sources as a check) its list is empty and recent torch
    fails inside cpp_extension with an IndexError.
    """
    import torch

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"


def _extension():
    with_cuda = _want_cuda()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "crf", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "crf", "cpu", "*.cpp")))
    portable = os.environ.get("WSSS_FAST_PORTABLE", "") == "1"
    # -ffp-contract=off: no fused multiply-add, so the lattice embedding rounds as
    # pydensecrf does and points fall in the same simplices.
    # OpenMP is required: ATen's parallel_for is an inline `omp parallel` region, so
    # without -fopenmp it silently runs on one thread.
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-DNDEBUG"]
    if not portable:
        cxx_flags.append("-march=native")
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-DNDEBUG"]
    define_macros = []
    if with_cuda:
        _default_cuda_arch()
        sources += sorted(glob.glob(os.path.join("csrc", "crf", "cuda", "*.cu")))
        define_macros.append(("WSSS_FAST_WITH_CUDA", "1"))
        cxx_flags.append("-DWSSS_FAST_WITH_CUDA=1")
        nvcc_flags.append("-DWSSS_FAST_WITH_CUDA=1")
        extension_cls = cpp_extension.CUDAExtension
    else:
        extension_cls = cpp_extension.CppExtension
    return extension_cls(
        name="wsss_fast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
        define_macros=define_macros,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
