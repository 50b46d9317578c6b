"""CAM utilities and pseudo-labels shared by the methods.

Conventions: ``cams`` (B, C, H, W) over the C foreground classes, ``image_labels``
(B, C) multi-hot floats, label maps (B, H, W) int64 with 0 background, c + 1 for
class c and ``ignore_index`` (255) for unknown. Boxes are (B, 4) int64
(top, bottom, left, right) in the pixels of the map they index.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from wsss_fast.data.palette import IGNORE_INDEX
from wsss_fast.ops import refine_pixel_adaptive

_NORMALIZE_EPS = 1e-5  # ToCo's: keeps an all-zero CAM at zero


def normalize_cams(cams: torch.Tensor) -> torch.Tensor:
    """ReLU then min-max per image and class: (B, C, H, W) -> same, values in [0, 1)."""
    cams = F.relu(cams)
    cams = cams - cams.amin(dim=(2, 3), keepdim=True)
    return cams / (cams.amax(dim=(2, 3), keepdim=True) + _NORMALIZE_EPS)


def box_mask(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 4) boxes -> (B, H, W) bool, True inside [top, bottom) x [left, right)."""
    height, width = size
    rows = torch.arange(height, device=boxes.device)
    columns = torch.arange(width, device=boxes.device)
    inside_rows = (rows >= boxes[:, 0, None]) & (rows < boxes[:, 1, None])
    inside_columns = (columns >= boxes[:, 2, None]) & (columns < boxes[:, 3, None])
    return inside_rows[:, :, None] & inside_columns[:, None, :]


def cams_to_labels(
    cams: torch.Tensor,
    image_labels: torch.Tensor,
    high_threshold: float,
    low_threshold: float,
    valid: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Normalised CAMs -> confident labels (ToCo's ``cam_to_label`` with ignore_mid).

    Per pixel v = max over the image's classes: class argmax + 1 where v > high,
    background where v <= low, ``ignore_index`` in between and outside ``valid``
    ((B, H, W) bool, e.g. ``box_mask``). Returns (B, H, W) int64.
    """
    masked = cams * image_labels[:, :, None, None]
    value, index = masked.max(dim=1)
    labels = torch.where(value > high_threshold, index + 1, ignore_index)
    labels = torch.where(value <= low_threshold, 0, labels)
    if valid is not None:
        labels = torch.where(valid, labels, ignore_index)
    return labels


def cams_to_prediction(
    cams: torch.Tensor, image_labels: torch.Tensor, background: float
) -> torch.Tensor:
    """Normalised CAMs -> a full label map: argmax over a constant ``background`` score
    and the image's classes (how CAM quality is scored). Returns (B, H, W) int64."""
    masked = cams * image_labels[:, :, None, None]
    background_map = torch.full_like(masked[:, :1], background)
    return torch.cat([background_map, masked], dim=1).argmax(dim=1)


def roi_map(
    cams: torch.Tensor, image_labels: torch.Tensor, high_threshold: float, low_threshold: float
) -> torch.Tensor:
    """ToCo's ROI map for local crops: 0 where max CAM <= low, 2 where >= high, else 1.
    (B, C, H, W) normalised CAMs -> (B, H, W) int64."""
    value = (cams * image_labels[:, :, None, None]).amax(dim=1)
    roi = torch.ones_like(value, dtype=torch.int64)
    roi = torch.where(value <= low_threshold, 0, roi)
    return torch.where(value >= high_threshold, 2, roi)


def refine_labels_with_par(
    images: torch.Tensor,
    cams: torch.Tensor,
    image_labels: torch.Tensor,
    high_threshold: float,
    low_threshold: float,
    valid: torch.Tensor,
    *,
    downscale: int = 2,
    dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
    iterations: int = 10,
    color_temperature: float = 0.3,
    position_weight: float = 0.01,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """ToCo's segmentation pseudo-labels: CAMs refined by PAR against a high and a low
    background, batched (one ``refine_pixel_adaptive`` call for both versions).

    Args:
        images: (B, 3, H, W) RGB in [0, 1] (de-normalised).
        cams: (B, C, H, W) normalised CAMs.
        image_labels: (B, C) multi-hot.
        valid: (B, H, W) bool, the pixels that show the image (the rest is ignored).

    Only the background and the image's classes compete: absent classes get -inf
    before the softmax, so PAR (linear in the maps) keeps them at exactly 0. The label
    is the "high" version's class; its background becomes ``ignore_index`` unless the
    "low" version says background too. Returns (B, H, W) int64.
    """
    batch, _, height, width = images.shape
    small = (height // downscale, width // downscale)
    small_images = F.interpolate(images, size=small, mode="bilinear", align_corners=False)
    small_cams = F.interpolate(cams, size=small, mode="bilinear", align_corners=False)
    present = torch.cat([torch.ones_like(image_labels[:, :1]), image_labels], dim=1) > 0
    scores = []
    for background in (high_threshold, low_threshold):
        with_background = torch.cat([torch.full_like(small_cams[:, :1], background), small_cams], 1)
        scores.append(with_background.masked_fill(~present[:, :, None, None], float("-inf")))
    probabilities = torch.cat(scores).softmax(dim=1)
    refined = refine_pixel_adaptive(
        small_images.repeat(2, 1, 1, 1),
        probabilities,
        dilations=dilations,
        iterations=iterations,
        w_color=color_temperature,
        w_pos=position_weight,
    )
    refined = F.interpolate(refined, size=(height, width), mode="bilinear", align_corners=False)
    high_labels, low_labels = refined.argmax(dim=1).split(batch)
    labels = torch.where(high_labels == 0, ignore_index, high_labels)
    labels = torch.where((high_labels == 0) & (low_labels == 0), 0, labels)
    return torch.where(valid, labels, ignore_index)


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of (B, H, W) integer label maps to (B, h, w)."""
    resized = F.interpolate(labels[:, None].float(), size=size, mode="nearest")
    return resized[:, 0].to(labels.dtype)
