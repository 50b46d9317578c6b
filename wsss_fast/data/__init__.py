"""Datasets (VOC, COCO, any VOC-layout folder, the built-in synthetic shapes), transforms
and the VOC palette."""

from wsss_fast.data.coco import COCO_CLASS_NAMES, COCOSegmentation
from wsss_fast.data.folder import SegmentationFolder, read_class_names, read_split_file
from wsss_fast.data.palette import (
    IGNORE_INDEX,
    colorize_labels,
    read_label_png,
    save_label_png,
    voc_palette,
)
from wsss_fast.data.synthetic import (
    SyntheticConfig,
    generate_synthetic_dataset,
    get_or_create_synthetic_dataset,
)
from wsss_fast.data.transforms import (
    EvalTransform,
    Normalization,
    TrainAugmentationConfig,
    TrainTransform,
    multi_scale_flip_inference,
    pixel_box_to_token_box,
)
from wsss_fast.data.voc import VOC_CLASS_NAMES, VOCSegmentation

__all__ = [
    "COCO_CLASS_NAMES",
    "IGNORE_INDEX",
    "VOC_CLASS_NAMES",
    "COCOSegmentation",
    "EvalTransform",
    "Normalization",
    "SegmentationFolder",
    "SyntheticConfig",
    "TrainAugmentationConfig",
    "TrainTransform",
    "VOCSegmentation",
    "colorize_labels",
    "generate_synthetic_dataset",
    "get_or_create_synthetic_dataset",
    "multi_scale_flip_inference",
    "pixel_box_to_token_box",
    "read_class_names",
    "read_label_png",
    "read_split_file",
    "save_label_png",
    "voc_palette",
]
