"""wsss_fast: fast weakly-supervised semantic segmentation with vision transformers.

Importing the package loads the compiled extension ``wsss_fast._C`` (the dense CRF and
the other compiled ops); a missing build raises an ImportError that says how to build.
"""

from wsss_fast._extension import load_compiled_extension

_C = load_compiled_extension()

__version__ = "0.1.0"
