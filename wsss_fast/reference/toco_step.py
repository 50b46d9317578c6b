"""ToCo's training step structured as the reference code: the baseline of the benchmark.

Same network and losses as ``wsss_fast.methods.toco.ToCo.training_step``, computed the
way ToCo's ``train_final_voc.py`` does (``multi_scale_cam2``, ``model(inputs,
crops=...)``, ``refine_cams_with_bkg_v2``, ``CTCLoss_neg``):

- the pseudo-label CAMs come from their own no-grad encoder passes at every scale,
  scale 1 included (the training pass is not reused);
- the two global views go through the encoder twice more with autograd (the teacher
  pass, detached afterwards, and the student pass), so the training crop is encoded
  three times with gradients;
- PTC and PAR run on the reference backends (N x N similarity; PAR image by image with
  dilated shift convolutions); CTC loops over images and positive views in Python;
- attention is explicit (no SDPA) when the caller switches it off with
  ``model.backbone.set_fused_attention(False)``, and nothing runs under autocast.

The local crops are drawn with the same function as the fused step, so both steps see
the same views for the same random state and their losses can be compared.
"""

import math

import torch
import torch.nn.functional as F

from wsss_fast.data.palette import IGNORE_INDEX
from wsss_fast.methods.cam import box_mask, cams_to_labels, normalize_cams, resize_labels, roi_map
from wsss_fast.methods.losses import segmentation_loss
from wsss_fast.methods.toco import StepOutput, ToCo, sample_local_crops
from wsss_fast.ops import refine_pixel_adaptive, token_contrast_loss


@torch.no_grad()
def multi_scale_cams(model: ToCo, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``multi_scale_cam2``: per scale one no-grad pass of the images and their flips."""
    batch, _, height, width = images.shape
    main_maps, aux_maps = [], []
    was_training = model.training
    model.eval()
    for scale in model.config.cam_scales:
        patch = model.backbone.patch_size
        size = [
            max(patch, math.floor(side * scale / patch + 0.5) * patch) for side in (height, width)
        ]
        scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        both = torch.cat([scaled, scaled.flip(-1)])
        output = model.backbone(both, intermediate_blocks=(model.aux_block,))
        main = model.classifier.cams(output.patch_map())
        aux = model.aux_classifier.cams(output.patch_map(output.intermediate[model.aux_block]))
        for maps, collected in ((main, main_maps), (aux, aux_maps)):
            maps = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)
            collected.append(F.relu(torch.maximum(maps[:batch], maps[batch:].flip(-1))))
    model.train(was_training)
    return normalize_cams(sum(main_maps)), normalize_cams(sum(aux_maps))


def refine_cams_with_background(model: ToCo, images, cams, image_labels, valid):
    """``refine_cams_with_bkg_v2``: a loop over images, PAR on each image's present classes."""
    config = model.config
    batch, _, height, width = images.shape
    small = (height // config.par_downscale, width // config.par_downscale)
    small_images = F.interpolate(images, size=small, mode="bilinear", align_corners=False)
    labels_with_background = torch.cat([torch.ones_like(image_labels[:, :1]), image_labels], 1)
    results = []
    for version in (config.high_threshold, config.low_threshold):
        background = torch.full_like(cams[:, :1], version)
        scores = F.interpolate(
            torch.cat([background, cams], 1), size=small, mode="bilinear", align_corners=False
        )
        refined_labels = torch.full((batch, height, width), IGNORE_INDEX, device=images.device)
        for index in range(batch):
            present = torch.nonzero(labels_with_background[index])[:, 0]
            probabilities = scores[index, present][None].softmax(dim=1)
            refined = refine_pixel_adaptive(
                small_images[index : index + 1],
                probabilities,
                dilations=config.par_dilations,
                iterations=config.par_iterations,
                w_color=config.par_color_temperature,
                w_pos=config.par_position_weight,
                backend="reference",
            )
            refined = F.interpolate(
                refined, size=(height, width), mode="bilinear", align_corners=False
            )
            refined_labels[index] = present[refined.argmax(dim=1)[0]]
        results.append(refined_labels)
    high, low = results
    labels = torch.where(high == 0, IGNORE_INDEX, high)
    labels = torch.where((high == 0) & (low == 0), 0, labels)
    return torch.where(valid, labels, IGNORE_INDEX).long()


def class_token_contrast_loops(teacher, student, positive, temperature):
    """``CTCLoss_neg`` with its loops (and without its stray for/else term)."""
    logits = torch.exp(teacher @ student.transpose(1, 2) / temperature)
    total = 0.0
    for image in range(teacher.shape[0]):
        negatives = logits[image][:, ~positive[image]].sum(dim=1)
        loss = 0.0
        for view in torch.nonzero(positive[image])[:, 0]:
            value = logits[image, :, view]
            loss = loss - torch.log(value / (value + negatives + 1e-4))
        total = total + loss.sum() / teacher.shape[1] / positive[image].sum()
    return total / teacher.shape[0]


def reference_training_step(model: ToCo, batch: dict, iteration: int) -> StepOutput:
    """ToCo's losses on ``batch``, structured as the reference code (module docstring)."""
    config = model.config
    images, image_labels = batch["image"], batch["label"]
    batch_size, _, height, width = images.shape
    valid = box_mask(batch["valid_box"], (height, width))
    global_views = torch.cat([images, batch["global_views"][:, 0]])

    cams, aux_cams = multi_scale_cams(model, images)
    roi = roi_map(aux_cams, image_labels, config.high_threshold, config.low_threshold)
    local_crops, local_positive = sample_local_crops(
        images, roi, config.local_crop_count, config.local_crop_size, config.negative_roi_ratio
    )

    output = model.backbone(images, intermediate_blocks=(model.aux_block,))
    token_map = output.patch_map()
    aux_map = output.patch_map(output.intermediate[model.aux_block])
    logits = model.classifier.logits(token_map, model.pooling(iteration))
    aux_logits = model.aux_classifier.logits(aux_map, model.pooling(iteration))
    seg_logits = model.seg_head(token_map)

    # Teacher pass (autograd, then detached) and student passes of the global views.
    teacher_tokens = model.backbone(global_views).class_token.detach()
    teacher = model.teacher_head(teacher_tokens).view(2, batch_size, -1).transpose(0, 1)
    student_global = model.backbone(global_views).class_token.view(2, batch_size, -1)
    student_local = model.backbone(local_crops.flatten(0, 1)).class_token
    student_tokens = torch.cat(
        [
            student_global.transpose(0, 1),
            student_local.view(batch_size, config.local_crop_count, -1),
        ],
        dim=1,
    )
    student = model.student_head(student_tokens)
    positive = torch.cat([torch.ones_like(local_positive[:, :2]), local_positive], dim=1)
    ctc = class_token_contrast_loops(teacher.detach(), student, positive, config.ctc_temperature)

    token_labels = resize_labels(
        cams_to_labels(aux_cams, image_labels, config.high_threshold, config.low_threshold, valid),
        output.grid,
    )
    ptc = token_contrast_loss(output.patch_tokens, token_labels.flatten(1), backend="reference")

    label_cams = cams if iteration >= config.main_cam_labels_iter else aux_cams
    seg_labels = refine_cams_with_background(
        model, model.normalization.denormalize(images.detach()), label_cams, image_labels, valid
    )
    seg_logits = F.interpolate(
        seg_logits, size=(height, width), mode="bilinear", align_corners=False
    )
    seg = segmentation_loss(seg_logits, seg_labels)

    return model.combine_losses(
        iteration, logits, aux_logits, image_labels, ptc, ctc, seg, seg_labels
    )
