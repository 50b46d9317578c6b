"""Public fused ops, each usable on its own as a drop-in."""

from wsss_fast.ops.dense_crf import dense_crf, dense_crf_inference

__all__ = ["dense_crf", "dense_crf_inference"]
