"""Overlay grids: one row per image, columns image | CAM heat map | pseudo-label |
prediction | ground truth (columns whose input is None are left out), written as PNG.

Label maps are drawn in the VOC palette over the image (ignore, 255, in VOC's cream);
CAMs as a jet heat map over the image. The trainer writes one grid of a fixed set of val
images after each evaluation.
"""

import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from wsss_fast.data.cache import atomic_write_bytes
from wsss_fast.data.palette import colorize_labels

ArrayLike = np.ndarray | torch.Tensor | Sequence[np.ndarray] | Sequence[torch.Tensor]


def _as_arrays(batch: ArrayLike, what: str) -> list[np.ndarray]:
    items = batch.detach().cpu().numpy() if isinstance(batch, torch.Tensor) else batch
    arrays = [
        item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
        for item in items
    ]
    if not arrays:
        raise ValueError(f"{what} is empty")
    return arrays


def _resize(array: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    height, width = size
    if array.shape[:2] == (height, width):
        return array
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(array, (width, height), interpolation=interpolation)


def cam_heat_map(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """A CAM as a jet heat map over the image.

    ``image`` (H, W, 3) uint8; ``cam`` (h, w) or (C, h, w) floats (several classes are
    max-reduced), scaled to [0, 1] by its maximum. Returns (H, W, 3) uint8.
    """
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim == 3:
        cam = cam.max(axis=0)
    if cam.ndim != 2:
        raise ValueError(f"cam must be (h, w) or (C, h, w), got shape {cam.shape}")
    cam = np.maximum(cam, 0)
    peak = cam.max()
    cam = cam / peak if peak > 0 else cam
    cam = _resize(cam, image.shape[:2], nearest=False)
    heat = cv2.applyColorMap(np.round(255 * cam).astype(np.uint8), cv2.COLORMAP_JET)
    heat = heat[..., ::-1].astype(np.float32)  # BGR -> RGB
    return np.round((1 - alpha) * image + alpha * heat).astype(np.uint8)


def label_overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.7) -> np.ndarray:
    """A label map in VOC colours over the image: (H, W, 3) uint8 and (H, W) -> (H, W, 3)."""
    colors = colorize_labels(_resize(np.asarray(labels).astype(np.uint8), image.shape[:2], True))
    return np.round((1 - alpha) * image + alpha * colors.astype(np.float32)).astype(np.uint8)


def overlay_grid(
    images: ArrayLike,
    cams: ArrayLike | None = None,
    pseudo_labels: ArrayLike | None = None,
    predictions: ArrayLike | None = None,
    ground_truths: ArrayLike | None = None,
    *,
    cell_size: tuple[int, int] | None = None,
    gap: int = 2,
) -> np.ndarray:
    """Builds the grid.

    Args:
        images: B images (H, W, 3) uint8 RGB (``Normalization.to_uint8_images`` makes
            them from a normalised batch).
        cams: B CAMs, (h, w) or (C, h, w) floats.
        pseudo_labels, predictions, ground_truths: B label maps (h, w) of class indices.
        cell_size: (height, width) of every cell; the first image's size by default.
        gap: white pixels between cells.

    Returns (rows * cell_height + (rows - 1) * gap, columns * cell_width +
    (columns - 1) * gap, 3) uint8.
    """
    image_list = _as_arrays(images, "images")
    for index, image in enumerate(image_list):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"images[{index}] must be (H, W, 3) uint8, got {image.shape} {image.dtype}"
            )
    columns = {
        name: _as_arrays(batch, name)
        for name, batch in (
            ("cams", cams),
            ("pseudo_labels", pseudo_labels),
            ("predictions", predictions),
            ("ground_truths", ground_truths),
        )
        if batch is not None
    }
    for name, arrays in columns.items():
        if len(arrays) != len(image_list):
            raise ValueError(f"{name} holds {len(arrays)} items for {len(image_list)} images")
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    height, width = cell_size or image_list[0].shape[:2]
    rows = []
    for index, image in enumerate(image_list):
        image = _resize(image, (height, width), nearest=False)
        cells = [image]
        for name, arrays in columns.items():
            if name == "cams":
                cells.append(cam_heat_map(image, arrays[index]))
            else:
                cells.append(label_overlay(image, arrays[index]))
        rows.append(cells)
    column_count = len(rows[0])
    grid = np.full(
        (len(rows) * (height + gap) - gap, column_count * (width + gap) - gap, 3),
        255,
        dtype=np.uint8,
    )
    for row_index, cells in enumerate(rows):
        for column_index, cell in enumerate(cells):
            top, left = row_index * (height + gap), column_index * (width + gap)
            grid[top : top + height, left : left + width] = cell
    return grid


def save_overlay_grid(
    path: str | os.PathLike,
    images: ArrayLike,
    cams: ArrayLike | None = None,
    pseudo_labels: ArrayLike | None = None,
    predictions: ArrayLike | None = None,
    ground_truths: ArrayLike | None = None,
    *,
    cell_size: tuple[int, int] | None = None,
    gap: int = 2,
) -> Path:
    """``overlay_grid`` of the same arguments, written atomically as a PNG at ``path``."""
    grid = overlay_grid(
        images, cams, pseudo_labels, predictions, ground_truths, cell_size=cell_size, gap=gap
    )
    encoded_ok, encoded = cv2.imencode(".png", grid[..., ::-1])
    if not encoded_ok:
        raise RuntimeError(f"PNG encoding of the overlay grid for {path} failed")
    atomic_write_bytes(path, encoded.tobytes())
    return Path(path)
