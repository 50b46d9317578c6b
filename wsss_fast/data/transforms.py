"""Training augmentations, normalisation and multi-scale + flip inference.

The training pipeline is ToCo's (methods.md): random rescale, horizontal flip, a crop
padded where the image is smaller, colour jitter. Three faults of the reference code are
avoided by construction:

- the flip is drawn once, before the crop, and applied to the image, the mask and every
  derived view; the valid box is recorded after it and never flipped again;
- the valid box is returned both in pixels and on the token grid (``token_box``), so
  nothing applies a pixel box to the token map;
- the mean and std come from the backbone's own pretrained config (timm), never from a
  constant: ViT weights expecting 0.5/0.5 get 0.5/0.5.

Boxes are (top, bottom, left, right), half-open, in the order of the reference's
``img_box``: ``mask[top:bottom, left:right]`` is the part of the crop that shows the image.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import timm.data
import timm.models
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from wsss_fast.data.palette import IGNORE_INDEX


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std (RGB, for images in [0, 1]) a backbone expects."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_timm(cls, model: torch.nn.Module | str) -> "Normalization":
        """Reads mean and std from a timm model's pretrained config.

        ``model`` is a timm model name (``"vit_base_patch16_224.augreg2_in21k_ft_in1k"``)
        or a module that is, or contains, a timm model (a wrapper is searched for the
        first submodule with a ``pretrained_cfg``). Raises ValueError when there is no
        pretrained config: guessing ImageNet statistics is the fault this avoids.
        """
        if isinstance(model, str):
            pretrained_cfg = timm.models.get_pretrained_cfg(model)
            if pretrained_cfg is None:
                raise ValueError(f"timm has no pretrained config for model {model!r}")
            config = timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict())
        else:
            timm_model = next(
                (module for module in model.modules() if getattr(module, "pretrained_cfg", None)),
                None,
            )
            if timm_model is None:
                raise ValueError(
                    f"{type(model).__name__} holds no timm model with a pretrained_cfg; "
                    "construct Normalization(mean=..., std=...) for it explicitly"
                )
            config = timm.data.resolve_model_data_config(timm_model)
        return cls(mean=tuple(config["mean"]), std=tuple(config["std"]))

    def __post_init__(self):
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values each, got {self.mean}, {self.std}")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")

    def _statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(3, 1, 1)
        return mean, std

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) floats in [0, 1] -> normalised, same shape and dtype."""
        mean, std = self._statistics(images)
        return (images - mean) / std

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised (..., 3, H, W) -> floats in [0, 1] (clamped), same shape and dtype."""
        mean, std = self._statistics(images)
        return (images * std + mean).clamp_(0.0, 1.0)

    def to_uint8_images(self, images: torch.Tensor) -> np.ndarray:
        """Normalised (B, 3, H, W) -> (B, H, W, 3) uint8 RGB, e.g. for ``visualize``."""
        pixels = self.denormalize(images.detach().float().cpu()) * 255.0
        return pixels.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def to_tensors(image: np.ndarray, mask: np.ndarray | None) -> dict[str, torch.Tensor]:
    """No augmentation: ``image`` (3, H, W) uint8 and ``mask`` (H, W) int64 tensors."""
    sample = {"image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)}
    if mask is not None:
        sample["mask"] = torch.from_numpy(mask.astype(np.int64))
    return sample


class EvalTransform:
    """Evaluation: the whole image, normalised; no augmentation, so no box.

    Returns ``image`` (3, H, W) float32 and, when a mask is given, ``mask`` (H, W) int64.
    """

    def __init__(self, normalization: Normalization):
        self.normalization = normalization

    def __call__(self, image: np.ndarray, mask: np.ndarray | None) -> dict[str, torch.Tensor]:
        sample = to_tensors(image, mask)
        sample["image"] = self.normalization.normalize(sample["image"].float() / 255.0)
        return sample


@dataclass
class TrainAugmentationConfig:
    """ToCo's training augmentations (methods.md); defaults are the reference values.

    ``global_view_count`` extra views are RandomResizedCrops of the (flipped) image,
    as ToCo's class-token contrast uses one; 0 makes none.
    """

    crop_size: int = 448
    rescale_range: tuple[float, float] = (0.5, 2.0)
    flip_probability: float = 0.5
    color_jitter_probability: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_probability: float = 0.2
    global_view_count: int = 0
    global_view_scale: tuple[float, float] = (0.4, 1.0)

    def __post_init__(self):
        if self.crop_size < 1:
            raise ValueError(f"crop_size must be positive, got {self.crop_size}")
        low, high = self.rescale_range
        if not 0 < low <= high:
            raise ValueError(
                f"rescale_range must satisfy 0 < low <= high, got {self.rescale_range}"
            )
        low, high = self.global_view_scale
        if not 0 < low <= high <= 1:
            raise ValueError(
                f"global_view_scale must satisfy 0 < low <= high <= 1, got {self.global_view_scale}"
            )
        for name in ("flip_probability", "color_jitter_probability", "grayscale_probability"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        if min(self.brightness, self.contrast, self.saturation) < 0:
            raise ValueError("brightness, contrast and saturation must be non-negative")
        if self.global_view_count < 0:
            raise ValueError(f"global_view_count must be >= 0, got {self.global_view_count}")


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(high_inclusive: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(0, high_inclusive + 1, (), generator=generator).item())


class TrainTransform:
    """ToCo's training augmentation of one image (see the module docstring).

    Args:
        config: the augmentation settings.
        normalization: the backbone's mean and std (``Normalization.from_timm``).
        patch_size: the backbone's patch size; ``crop_size`` must be a multiple of it.

    Calling it with ``image`` (H, W, 3) uint8 RGB and ``mask`` (H, W) uint8 or None
    (and an optional ``torch.Generator``; the global torch RNG otherwise, which
    DataLoader seeds per worker) returns:

    - ``image``: (3, S, S) float32, normalised; padding is 0 (the mean colour);
    - ``mask``: (S, S) int64, 255 on padding (only when a mask was given);
    - ``valid_box``: (4,) int64 (top, bottom, left, right), pixels of the crop showing
      the image;
    - ``token_box``: (4,) int64, the same box on the (S/p, S/p) token grid: the tokens
      that overlap the valid region (start floored, end rounded up);
    - ``global_views``: (V, 3, S, S) float32, only when ``config.global_view_count`` > 0.
    """

    def __init__(
        self, config: TrainAugmentationConfig, normalization: Normalization, patch_size: int
    ):
        if patch_size < 1 or config.crop_size % patch_size:
            raise ValueError(
                f"crop_size {config.crop_size} must be a multiple of patch_size {patch_size}"
            )
        self.config = config
        self.normalization = normalization
        self.patch_size = patch_size

    def __call__(
        self,
        image: np.ndarray,
        mask: np.ndarray | None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        config = self.config
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        if mask is not None and mask.shape != image.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape[:2]}")

        # The one flip of this sample: everything below, views included, derives from it.
        if _uniform(0.0, 1.0, generator) < config.flip_probability:
            image = image[:, ::-1]
            mask = None if mask is None else mask[:, ::-1]
        image = np.ascontiguousarray(image)
        mask = None if mask is None else np.ascontiguousarray(mask)

        scale = _uniform(*config.rescale_range, generator)
        height, width = image.shape[:2]
        scaled_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        scaled_image = cv2.resize(image, scaled_size, interpolation=cv2.INTER_LINEAR)
        scaled_mask = (
            None if mask is None else cv2.resize(mask, scaled_size, interpolation=cv2.INTER_NEAREST)
        )

        top, bottom, left, right, source_top, source_left = self._crop_geometry(
            scaled_image.shape[0], scaled_image.shape[1], generator
        )
        rows = slice(source_top, source_top + bottom - top)
        columns = slice(source_left, source_left + right - left)

        crop = self.config.crop_size
        # Jitter only the image content, then paste: the padding stays the mean colour.
        content = self._color_jitter(
            torch.from_numpy(np.ascontiguousarray(scaled_image[rows, columns])).permute(2, 0, 1),
            generator,
        )
        crop_image = torch.zeros(3, crop, crop, dtype=torch.float32)
        crop_image[:, top:bottom, left:right] = self.normalization.normalize(
            content.float() / 255.0
        )
        sample = {
            "image": crop_image,
            "valid_box": torch.tensor([top, bottom, left, right], dtype=torch.int64),
            "token_box": torch.tensor(
                pixel_box_to_token_box((top, bottom, left, right), self.patch_size),
                dtype=torch.int64,
            ),
        }
        if scaled_mask is not None:
            crop_mask = torch.full((crop, crop), IGNORE_INDEX, dtype=torch.int64)
            crop_mask[top:bottom, left:right] = torch.from_numpy(
                scaled_mask[rows, columns].astype(np.int64)
            )
            sample["mask"] = crop_mask
        if config.global_view_count:
            sample["global_views"] = torch.stack(
                [self._global_view(image, generator) for _ in range(config.global_view_count)]
            )
        return sample

    def _crop_geometry(
        self, height: int, width: int, generator: torch.Generator | None
    ) -> tuple[int, int, int, int, int, int]:
        """Random padding then a random crop of the padded image, as in the reference.

        Returns the valid box (top, bottom, left, right) in crop pixels and the image
        pixel (source_top, source_left) that lands at (top, left).
        """
        crop = self.config.crop_size
        padded_height, padded_width = max(crop, height), max(crop, width)
        pad_top = _randint(padded_height - height, generator)
        pad_left = _randint(padded_width - width, generator)
        crop_top = _randint(padded_height - crop, generator)
        crop_left = _randint(padded_width - crop, generator)
        # One of pad and crop offset is 0 per axis, so the box is never empty.
        top = max(pad_top - crop_top, 0)
        left = max(pad_left - crop_left, 0)
        bottom = min(crop, pad_top + height - crop_top)
        right = min(crop, pad_left + width - crop_left)
        return top, bottom, left, right, max(crop_top - pad_top, 0), max(crop_left - pad_left, 0)

    def _color_jitter(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """torchvision's ColorJitter + RandomGrayscale on (3, h, w) uint8, from ``generator``."""
        config = self.config
        if _uniform(0.0, 1.0, generator) < config.color_jitter_probability:
            # (adjustment, factor range): factors around 1 scale, the hue shift is around 0.
            adjustments = (
                (TF.adjust_brightness, max(0.0, 1 - config.brightness), 1 + config.brightness),
                (TF.adjust_contrast, max(0.0, 1 - config.contrast), 1 + config.contrast),
                (TF.adjust_saturation, max(0.0, 1 - config.saturation), 1 + config.saturation),
                (TF.adjust_hue, -config.hue, config.hue),
            )
            for index in torch.randperm(4, generator=generator).tolist():
                adjust, low, high = adjustments[index]
                image = adjust(image, _uniform(low, high, generator))
        if _uniform(0.0, 1.0, generator) < config.grayscale_probability:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        return image

    def _global_view(self, image: np.ndarray, generator: torch.Generator | None) -> torch.Tensor:
        """A RandomResizedCrop (area in ``global_view_scale``, aspect 3/4..4/3) of the
        already flipped image, resized to the crop size, colour-jittered, normalised."""
        height, width = image.shape[:2]
        area = height * width
        low_scale, high_scale = self.config.global_view_scale
        log_ratio = (math.log(3 / 4), math.log(4 / 3))
        # torchvision's sampling: ten tries, then the largest centred crop.
        for _ in range(10):
            target_area = area * _uniform(low_scale, high_scale, generator)
            aspect = math.exp(_uniform(*log_ratio, generator))
            view_width = round(math.sqrt(target_area * aspect))
            view_height = round(math.sqrt(target_area / aspect))
            if 0 < view_width <= width and 0 < view_height <= height:
                top = _randint(height - view_height, generator)
                left = _randint(width - view_width, generator)
                break
        else:
            view_height, view_width = height, width
            top, left = 0, 0
        crop = self.config.crop_size
        region = image[top : top + view_height, left : left + view_width]
        resized = cv2.resize(region, (crop, crop), interpolation=cv2.INTER_LINEAR)
        jittered = self._color_jitter(torch.from_numpy(resized).permute(2, 0, 1), generator)
        return self.normalization.normalize(jittered.float() / 255.0)


def pixel_box_to_token_box(box: Sequence[int], patch_size: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) in pixels -> the tokens of a ``patch_size`` grid that
    overlap it: start // p, ceil(end / p)."""
    top, bottom, left, right = (int(value) for value in box)
    return (
        top // patch_size,
        -(-bottom // patch_size),
        left // patch_size,
        -(-right // patch_size),
    )


def multi_scale_flip_inference(
    forward: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = True,
    flip_merge: str = "max",
    output_size: tuple[int, int] | None = None,
    size_divisor: int = 1,
) -> torch.Tensor:
    """Runs ``forward`` over rescaled (and flipped) copies of ``images``; merges the maps.

    Shared by CAM generation and segmentation inference. Per scale, the images are
    resized (bilinear) to a size rounded to a multiple of ``size_divisor`` (the patch
    size, for a ViT) and passed together with their horizontal flips as one batch; the
    maps are resized (bilinear) to ``output_size``, the flipped ones flipped back and
    merged with the unflipped ones by ``flip_merge`` ("max": ToCo's CAMs, "sum":
    WeakTr's and segmentation's), and the scales are summed. Runs under the caller's
    grad mode.

    Args:
        forward: (b, 3, h, w) -> (b, K, h', w') maps (logits, CAMs, ...).
        images: (B, 3, H, W) normalised images.
        output_size: (H_out, W_out); the input size by default.

    Returns (B, K, H_out, W_out) in the dtype ``forward`` returns.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be a non-empty list of positive numbers, got {scales}")
    if flip_merge not in ("max", "sum"):
        raise ValueError(f"flip_merge must be 'max' or 'sum', got {flip_merge!r}")
    if size_divisor < 1:
        raise ValueError(f"size_divisor must be positive, got {size_divisor}")
    batch, _, height, width = images.shape
    output_size = (height, width) if output_size is None else tuple(output_size)
    merged = None
    for scale in scales:
        # Halves round up (not Python's round-half-to-even): 1.5 patches -> 2.
        scaled_size = tuple(
            max(size_divisor, math.floor(side * scale / size_divisor + 0.5) * size_divisor)
            for side in (height, width)
        )
        scaled = images
        if scaled_size != (height, width):
            scaled = F.interpolate(images, size=scaled_size, mode="bilinear", align_corners=False)
        if flip:
            scaled = torch.cat([scaled, scaled.flip(-1)])
        maps = forward(scaled)
        if maps.ndim != 4 or maps.shape[0] != scaled.shape[0]:
            raise ValueError(
                f"forward must return (b, K, h, w) maps for its b={scaled.shape[0]} inputs, "
                f"got shape {tuple(maps.shape)}"
            )
        # Resized before the flip merge, as ToCo's multi_scale_cam (max does not commute
        # with the interpolation).
        maps = F.interpolate(maps, size=output_size, mode="bilinear", align_corners=False)
        if flip:
            unflipped, flipped_back = maps[:batch], maps[batch:].flip(-1)
            if flip_merge == "max":
                maps = torch.maximum(unflipped, flipped_back)
            else:
                maps = unflipped + flipped_back
        merged = maps if merged is None else merged + maps
    return merged
