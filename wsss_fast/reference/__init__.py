"""Plain-PyTorch / numpy reference implementations: ground truth for tests and benchmarks.

Never imported by the fast path except when the reference backend is asked for.
"""
