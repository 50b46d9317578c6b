"""PASCAL VOC 2012 with the SBD augmentation, in the form WSSS code bases use.

``root`` is ``VOCdevkit/VOC2012`` (or ``VOCdevkit``, which holds it):

    JPEGImages/<name>.jpg
    SegmentationClass/<name>.png        VOC's masks (palette PNGs, 255 on boundaries)
    SegmentationClassAug/<name>.png     the SBD-augmented masks (train_aug)
    ImageSets/Segmentation/{train,val,trainval,test}.txt
    ImageSets/SegmentationAug/train_aug.txt  (or ImageSets/Segmentation/train_aug.txt)

``train_aug`` (10,582 images) reads SegmentationClassAug, the other splits
SegmentationClass; ``test`` has no masks, so its samples carry no mask and no label.
"""

import os
from pathlib import Path

from wsss_fast.data.folder import SegmentationFolder, Transform, first_existing_file

VOC_CLASS_NAMES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

AUGMENTED_SPLITS = ("train_aug",)
IMAGE_ONLY_SPLITS = ("test",)


class VOCSegmentation(SegmentationFolder):
    """A split of PASCAL VOC 2012 (+ SBD): 21 classes with background, 255 ignored.

    Args:
        root: ``VOCdevkit/VOC2012`` or ``VOCdevkit``.
        split: ``train``, ``train_aug``, ``val``, ``trainval``, ``test`` or another list
            under ``ImageSets/Segmentation``.
        transform: as in ``SegmentationFolder``.
        split_file: a split list elsewhere (e.g. the train_aug.txt a code base ships).
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
            raise FileNotFoundError(f"VOC root {root} does not exist or is no folder")
        if (root / "VOC2012").is_dir():
            root = root / "VOC2012"
        if split_file is None:
            candidates = [root / "ImageSets" / "Segmentation" / f"{split}.txt"]
            if split in AUGMENTED_SPLITS:
                candidates.insert(0, root / "ImageSets" / "SegmentationAug" / f"{split}.txt")
            split_file = first_existing_file(candidates, f"split file for VOC split {split!r}")
        if split in IMAGE_ONLY_SPLITS:
            mask_dir = None
        elif split in AUGMENTED_SPLITS:
            mask_dir = "SegmentationClassAug"
        else:
            mask_dir = "SegmentationClass"
        super().__init__(
            root,
            split,
            transform=transform,
            class_names=VOC_CLASS_NAMES,
            mask_dir=mask_dir,
            split_file=split_file,
        )
