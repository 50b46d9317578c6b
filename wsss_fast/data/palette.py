"""The PASCAL VOC colour palette and label-map PNG input/output.

Label maps are stored as palette ("P" mode) PNGs whose pixel values are the class
indices, the form of VOC's SegmentationClass: any viewer shows them in VOC colours and
any reader gets the indices back. Index 255 (ignore) is VOC's cream boundary colour.
"""

import os
from pathlib import Path

import numpy as np
from PIL import Image

IGNORE_INDEX = 255
"""The label of pixels that count for no class (VOC's object boundaries, crop padding)."""


def voc_palette(num_entries: int = 256) -> np.ndarray:
    """The VOC colour map: (num_entries, 3) uint8, entry k the RGB colour of class k.

    Each class index spreads its bits over the high bits of R, G and B (VOC devkit's
    ``labelcolormap``), so neighbouring indices get clearly different colours.
    """
    if not 1 <= num_entries <= 256:
        raise ValueError(f"num_entries must be in [1, 256], got {num_entries}")
    indices = np.arange(num_entries)
    palette = np.zeros((num_entries, 3), dtype=np.int64)
    remaining = indices.copy()
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= ((remaining >> channel) & 1) << (7 - bit)
        remaining >>= 3
    return palette.astype(np.uint8)


_PALETTE = voc_palette()


def colorize_labels(labels: np.ndarray) -> np.ndarray:
    """Colours a label map: (H, W) integer class indices -> (H, W, 3) uint8 RGB."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a (H, W) map, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError("labels must lie in [0, 255] to be coloured with the VOC palette")
    return _PALETTE[labels.astype(np.intp)]


def save_label_png(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Writes a (H, W) label map with values in [0, 255] as a VOC palette PNG."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a (H, W) map, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"labels for {path} must lie in [0, 255]")
    image = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8))
    image.putpalette(_PALETTE.tobytes())  # turns the "L" image into a "P" one
    image.save(path, format="PNG")


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """Reads a label map PNG (palette or single-channel) as (H, W) uint8 class indices.

    Raises FileNotFoundError when the file is missing and ValueError when it cannot be
    decoded or holds colours (RGB) rather than class indices.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label map {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode in ("P", "L"):
                return np.array(image, dtype=np.uint8)
            if mode in ("I", "I;16", "I;16B", "I;16L"):
                values = np.asarray(image)
                if values.size and (values.min() < 0 or values.max() > 255):
                    raise ValueError(
                        f"label map {path} holds values outside [0, 255] "
                        f"(min {values.min()}, max {values.max()})"
                    )
                return values.astype(np.uint8)
    except OSError as error:
        raise ValueError(f"label map {path} cannot be read as an image: {error}") from error
    raise ValueError(
        f"label map {path} is a {mode!r} image; expected a palette ('P') or single-channel "
        "('L') PNG whose pixel values are class indices"
    )
