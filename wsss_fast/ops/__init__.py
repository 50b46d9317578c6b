"""Public fused ops, each usable on its own as a drop-in."""

from wsss_fast.ops.adaptive_topk_pool import adaptive_topk_pool
from wsss_fast.ops.attention_fusion import fuse_attention_maps
from wsss_fast.ops.dense_crf import dense_crf, dense_crf_inference
from wsss_fast.ops.pixel_adaptive_refine import refine_pixel_adaptive
from wsss_fast.ops.token_contrast import token_contrast_loss

__all__ = [
    "adaptive_topk_pool",
    "dense_crf",
    "dense_crf_inference",
    "fuse_attention_maps",
    "refine_pixel_adaptive",
    "token_contrast_loss",
]
