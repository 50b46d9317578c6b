"""Pixel-level self-supervision's training step written the plain way: the benchmark's
baseline.

The method has no public code (methods.md, section 3), so this follows the structure of
the WSSS research code it builds on (ToCo's ``multi_scale_cam2``, per-image PAR, loops
over images and classes): same network and losses as
``wsss_fast.methods.pixel_sup.PixelSup.training_step``, computed

- with one SupportNet pass per scale for the CAMs and a second SupportNet pass of the
  crop for the features (a CAM function and a feature function, each encoding the image);
- with the region labels, the prototypes, the InfoNCE and the MAM loss looped over images
  and classes in Python;
- with PAR image by image on the reference backend (ToCo's ``refine_cams_with_bkg_v2``);
- with explicit attention (no SDPA) when the caller switches it off with
  ``model.backbone.set_fused_attention(False)`` (and on the SupportNet's backbone), in
  fp32.
"""

import torch
import torch.nn.functional as F

from wsss_fast.data.palette import IGNORE_INDEX
from wsss_fast.methods.base import StepOutput
from wsss_fast.methods.cam import box_mask, normalize_cams
from wsss_fast.methods.losses import segmentation_loss
from wsss_fast.methods.pixel_sup import PixelSup, scaled_side
from wsss_fast.reference.toco_step import refine_cams_with_background


@torch.no_grad()
def support_cams(model: PixelSup, images: torch.Tensor) -> torch.Tensor:
    """Per scale a SupportNet pass, the CAM resized to the crop and normalised; max over
    the scales. (B, C, S, S)."""
    size = images.shape[-2:]
    maps = []
    for scale in model.config.cam_scales:
        scaled_size = [scaled_side(side, scale, model.backbone.patch_size) for side in size]
        scaled = F.interpolate(images, size=scaled_size, mode="bilinear", align_corners=False)
        output = model.support.backbone(scaled)
        cams = model.support.classifier.cams(output.patch_map())
        maps.append(
            normalize_cams(F.interpolate(cams, size=size, mode="bilinear", align_corners=False))
        )
    return torch.stack(maps).amax(dim=0)


@torch.no_grad()
def support_features(model: PixelSup, images: torch.Tensor) -> torch.Tensor:
    """The SupportNet's features of the crop from their own pass. (B, N, E)."""
    return model.support.projection(model.support.backbone(images).patch_tokens)


def region_labels(model: PixelSup, cams, image_labels, valid_tokens) -> torch.Tensor:
    """Per image and token: the image's class with the largest CAM above the foreground
    threshold, background where all of them are at or below the background threshold."""
    config = model.config
    labels = torch.full(cams.shape[:1] + cams.shape[2:], IGNORE_INDEX, dtype=torch.int64)
    for image in range(cams.shape[0]):
        present = torch.nonzero(image_labels[image])[:, 0]
        value, index = cams[image, present].max(dim=0)
        image_labels_map = torch.full_like(index, IGNORE_INDEX)
        image_labels_map[value > config.foreground_threshold] = (
            present[index[value > config.foreground_threshold]] + 1
        )
        image_labels_map[value <= config.background_threshold] = 0
        image_labels_map[~valid_tokens[image]] = IGNORE_INDEX
        labels[image] = image_labels_map
    return labels.to(cams.device)


def regional_contrast(model: PixelSup, features, prototype_features, labels) -> torch.Tensor:
    """RCM with loops: prototypes class by class, the InfoNCE image by image."""
    prototypes, present = [], []
    for label in range(model.num_classes + 1):
        members = labels == label
        if members.any():
            prototypes.append(F.normalize(prototype_features[members].mean(dim=0), dim=0))
            present.append(label)
    if not present:
        return features.sum() * 0.0
    prototypes = torch.stack(prototypes)
    index_of = {label: position for position, label in enumerate(present)}
    total, count = 0.0, 0
    for image in range(features.shape[0]):
        keep = labels[image] != IGNORE_INDEX
        if not keep.any():
            continue
        scores = F.normalize(features[image, keep], dim=-1) @ prototypes.t()
        targets = torch.tensor([index_of[int(label)] for label in labels[image, keep]])
        scores = scores / model.config.contrast_temperature
        total = total + F.cross_entropy(scores, targets.to(scores.device), reduction="sum")
        count += int(keep.sum())
    return total / count


def multi_scale_attention(main_cams, target, image_labels, valid_tokens) -> torch.Tensor:
    """MAM with loops over images and their classes."""
    total, count = main_cams.sum() * 0.0, 0
    for image in range(main_cams.shape[0]):
        for cls in torch.nonzero(image_labels[image])[:, 0]:
            cam = main_cams[image, cls]
            cam = F.relu(cam)
            low = cam.min().detach()
            cam = (cam - low) / ((cam - low).max().detach() + 1e-5)
            keep = valid_tokens[image]
            total = total + F.relu(target[image, cls][keep] - cam[keep]).sum()
            count += int(keep.sum())
    return total / max(count, 1)


def reference_training_step(model: PixelSup, batch: dict, iteration: int) -> StepOutput:
    """The method's losses on ``batch``, structured as the plain research code (module
    docstring)."""
    config = model.config
    images, image_labels = batch["image"], batch["label"]
    _, _, height, width = images.shape
    valid = box_mask(batch["valid_box"], (height, width))

    cams = support_cams(model, images)
    prototype_features = support_features(model, images)

    output = model.backbone(images)
    token_map = output.patch_map()
    logits = model.classifier.logits(token_map, config.pooling)
    main_cams = model.classifier.cams(token_map)
    features = model.projection(output.patch_tokens)
    seg_logits = model.seg_head(token_map)

    token_cams = F.interpolate(cams, size=output.grid, mode="area")
    valid_tokens = F.max_pool2d(valid[:, None].float(), model.backbone.patch_size)[:, 0] > 0
    labels = region_labels(model, token_cams, image_labels, valid_tokens)
    rcm = regional_contrast(model, features, prototype_features, labels.flatten(1))
    mam = multi_scale_attention(main_cams, token_cams, image_labels, valid_tokens)

    seg_labels = refine_cams_with_background(
        model, model.normalization.denormalize(images.detach()), cams, image_labels, valid
    )
    seg_logits = F.interpolate(
        seg_logits, size=(height, width), mode="bilinear", align_corners=False
    )
    seg = segmentation_loss(seg_logits, seg_labels)
    return model.combine_losses(iteration, logits, image_labels, rcm, mam, seg, seg_labels)
