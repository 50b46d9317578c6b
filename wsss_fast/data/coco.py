"""MS COCO 2014 in the form WSSS code bases use (ToCo, MCTformer, ...).

Images plus per-image class-index PNG masks (0 background, 1..80 the COCO categories in
their usual order, 255 ignore) and split lists of image names:

    JPEGImages/train2014/COCO_train2014_<id>.jpg    JPEGImages/val2014/...
    SegmentationClass/train2014/COCO_train2014_<id>.png    SegmentationClass/val2014/...
    ImageSets/<split>.txt  (or <split>.txt in the root)

A split whose name starts with ``train`` reads the train2014 folders, one starting with
``val`` the val2014 folders (``val``, ``val_part``, ...).
"""

import os
from pathlib import Path

from wsss_fast.data.folder import SegmentationFolder, Transform, first_existing_file

COCO_CLASS_NAMES = (
    "background",
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench",
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
    "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog",
    "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table",
    "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave",
    "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


def coco_image_folder(split: str) -> str:
    """The COCO 2014 folder a split reads: ``train2014`` or ``val2014``."""
    if split.startswith("train"):
        return "train2014"
    if split.startswith("val"):
        return "val2014"
    raise ValueError(f"COCO split must start with 'train' or 'val', got {split!r}")


class COCOSegmentation(SegmentationFolder):
    """A split of COCO 2014 for WSSS: 81 classes with background, 255 ignored.

    Args:
        root: the folder holding JPEGImages/ and SegmentationClass/.
        split: ``train``, ``val`` or another list whose name starts with one of them.
        transform: as in ``SegmentationFolder``.
        split_file: a split list elsewhere (e.g. the one a code base ships).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        transform: Transform | None = None,
        split_file: str | os.PathLike | None = None,
    ):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"COCO root {root} does not exist or is no folder")
        folder = coco_image_folder(split)
        if split_file is None:
            split_file = first_existing_file(
                [root / "ImageSets" / f"{split}.txt", root / f"{split}.txt"],
                f"split file for COCO split {split!r}",
            )
        super().__init__(
            root,
            split,
            transform=transform,
            class_names=COCO_CLASS_NAMES,
            image_dir=f"JPEGImages/{folder}",
            mask_dir=f"SegmentationClass/{folder}",
            split_file=split_file,
        )
