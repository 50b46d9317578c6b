"""The compiled extension: a missing build is reported with the command that builds it."""

import subprocess
import sys

import torch

from wsss_fast._extension import has_cuda_kernels


def test_missing_extension_says_how_to_build():
    # sys.modules[name] = None makes `import name` fail, as an unbuilt extension does.
    code = "import sys; sys.modules['wsss_fast._C'] = None; import wsss_fast"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "pip install --no-build-isolation -e ." in result.stderr


def test_dense_crf_op_has_a_cpu_kernel():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("wsss_fast::dense_crf_inference", "CPU")
    assert isinstance(has_cuda_kernels(), bool)
