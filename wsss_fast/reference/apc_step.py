"""APC's training step structured as the reference code: the baseline of the benchmark.

APC publishes no code; this follows the structure of its predecessors' (ViT-PCM's
training loop, ToCo's PTC and PAR): same network and losses as
``wsss_fast.methods.apc.APC.training_step``, computed

- with two encoder passes, one for the crops and one for their transformed views
  (ViT-PCM encodes the image and its equivariance view separately);
- adaptive-K pooling by sorting every row (the reference op), PCL with the (B, N, N)
  similarity and relation tensors (the reference op), PAR image by image on the
  reference backend;
- with explicit attention (no SDPA) when the caller switches it off with
  ``model.backbone.set_fused_attention(False)``, and nothing under autocast.

The transforms are drawn with the same function as the fused step, so both steps see
the same views for the same random state and their losses can be compared.
"""

import torch
import torch.nn.functional as F

from wsss_fast.methods.apc import (
    APC,
    equivariance_loss,
    image_score_bce,
    random_zoom_flip,
    warp,
)
from wsss_fast.methods.base import StepOutput
from wsss_fast.methods.cam import box_mask, resize_labels
from wsss_fast.methods.losses import segmentation_loss
from wsss_fast.ops import refine_pixel_adaptive, token_contrast_loss
from wsss_fast.reference.adaptive_topk_pool import adaptive_topk_pool


def refine_labels_per_image(model: APC, images, label_probabilities, valid) -> torch.Tensor:
    """PAR-refined segmentation labels, a loop over images on the reference backend."""
    config = model.config
    size = images.shape[-2:]
    small = (size[0] // config.par_downscale, size[1] // config.par_downscale)
    rgb = model.normalization.denormalize(images.detach().float())
    refined_maps = []
    for index in range(images.shape[0]):
        small_image = F.interpolate(
            rgb[index : index + 1], size=small, mode="bilinear", align_corners=False
        )
        probabilities = F.interpolate(
            label_probabilities[index : index + 1], size=small, mode="bilinear", align_corners=False
        )
        refined = refine_pixel_adaptive(
            small_image,
            probabilities,
            dilations=config.par_dilations,
            iterations=config.par_iterations,
            w_color=config.par_color_temperature,
            w_pos=config.par_position_weight,
            backend="reference",
        )
        refined_maps.append(F.interpolate(refined, size=size, mode="bilinear", align_corners=False))
    return model.confident_labels(torch.cat(refined_maps), valid)


def reference_training_step(model: APC, batch: dict, iteration: int) -> StepOutput:
    """APC's losses on ``batch``, structured as the reference code (module docstring)."""
    config = model.config
    images, image_labels = batch["image"], batch["label"]
    batch_size, _, height, width = images.shape
    valid = box_mask(batch["valid_box"], (height, width))
    theta = random_zoom_flip(
        batch_size,
        config.equivariance_scale_range,
        config.equivariance_flip_probability,
        images.device,
    )

    output = model.backbone(images)
    view_output = model.backbone(warp(images, theta))
    logits = model.patch_logits(output.patch_tokens, output.grid)
    probabilities = logits.softmax(dim=1)
    view_probabilities = model.patch_logits(view_output.patch_tokens, view_output.grid).softmax(1)

    scores = probabilities.flatten(2)
    pooled = adaptive_topk_pool(
        scores, gamma=config.pooling_gamma, k_max=model.pooling_k_max(scores.shape[-1])
    )
    bce = image_score_bce(pooled, image_labels)

    label_probabilities = model.present_class_probabilities(logits, image_labels)
    token_labels = model.confident_labels(label_probabilities, resize_labels(valid, output.grid))
    pcl = token_contrast_loss(
        output.patch_tokens,
        token_labels.flatten(1),
        absolute=False,
        margin=config.pcl_margin,
        backend="reference",
    )

    equivariance = equivariance_loss(probabilities, view_probabilities, theta)

    if model.seg_head is None:
        return model.combine_losses(iteration, bce, pcl, equivariance)
    seg_labels = refine_labels_per_image(model, images, label_probabilities, valid)
    seg_logits = F.interpolate(
        model.seg_head(output.patch_map()),
        size=(height, width),
        mode="bilinear",
        align_corners=False,
    )
    seg = segmentation_loss(seg_logits, seg_labels)
    return model.combine_losses(iteration, bce, pcl, equivariance, seg, seg_labels)
