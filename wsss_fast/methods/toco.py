"""ToCo, token contrast for WSSS (Ru et al., CVPR 2023; methods.md section 1).

One network, one stage: a ViT classifier (global max pooling, bias-free 1x1 conv) with
an auxiliary classifier on an intermediate block, patch token contrast (PTC) on the
final tokens with labels from the aux CAM, class token contrast (CTC) between global
views and ROI-guided local crops through a student and an EMA teacher projection head,
and a LargeFOV segmentation head trained on CAM pseudo-labels refined by PAR.

Fixed here, against the reference code:
- no repeated encoder pass of the same image: the training crop and the second global
  view go through the encoder once, together; the scale-1 CAM of the pseudo-labels and
  the teachers' class tokens are taken (detached) from that pass; the local crops of
  all images go through in one batch; no Python loop over crops or images;
- the segmentation loss is 0 with zero gradient on a fully ignored crop (never NaN);
- CTC has no stray always-on term and is computed in log space;
- the valid box is applied in pixels to pixel maps (token labels are resized from them).
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from wsss_fast.config import ModelConfig, ToCoConfig
from wsss_fast.data.palette import IGNORE_INDEX
from wsss_fast.data.transforms import Normalization, multi_scale_flip_inference
from wsss_fast.methods.base import StepOutput, WSSSMethod
from wsss_fast.methods.cam import (
    box_mask,
    cams_to_labels,
    normalize_cams,
    refine_labels_with_par,
    resize_labels,
    roi_map,
)
from wsss_fast.methods.losses import class_token_contrast_loss, segmentation_loss
from wsss_fast.models.backbone import ViTBackbone
from wsss_fast.models.heads import LargeFOVHead, ProjectionHead, TokenClassifier
from wsss_fast.ops import token_contrast_loss


class ToCo(WSSSMethod):
    """ToCo's network and training losses.

    Args:
        model_config: backbone and head settings.
        config: ToCo's numbers.
        num_classes: C, the foreground classes (the seg head predicts C + 1).
        crop_size: the training crop (position embedding size at creation).
        normalization: how images are normalised (PAR needs them de-normalised); by
            default the backbone's own pretrained config (timm's data config).
    """

    def __init__(
        self,
        model_config: ModelConfig,
        config: ToCoConfig,
        num_classes: int,
        crop_size: int,
        normalization: Normalization | None = None,
    ):
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.backbone = ViTBackbone(
            model_config.backbone,
            model_config.pretrained,
            img_size=crop_size,
            drop_path_rate=model_config.drop_path_rate,
        )
        self.normalization = normalization or Normalization.from_timm(self.backbone.vit)
        self.aux_block = self.backbone.block_index(model_config.aux_layer)
        patch_size = self.backbone.patch_size
        if config.local_crop_size % patch_size:
            raise ValueError(
                f"toco.local_crop_size {config.local_crop_size} must be a multiple of the "
                f"backbone's patch size {patch_size}"
            )
        width = self.backbone.embed_dim
        self.classifier = TokenClassifier(width, num_classes)
        self.aux_classifier = TokenClassifier(width, num_classes)
        self.seg_head = LargeFOVHead(
            width, num_classes + 1, model_config.seg_head_channels, model_config.seg_head_dilation
        )
        self.student_head = ProjectionHead(
            width,
            config.projection_hidden_dim,
            config.projection_bottleneck_dim,
            config.projection_out_dim,
        )
        self.teacher_head = copy.deepcopy(self.student_head).requires_grad_(False)

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone parameters, head parameters): heads train at a higher rate."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        heads = [
            p
            for module in (self.classifier, self.aux_classifier, self.seg_head, self.student_head)
            for p in module.parameters()
            if p.requires_grad
        ]
        return backbone, heads

    @torch.no_grad()
    def after_step(self) -> None:
        """EMA of the student head into the teacher head (after each optimizer step)."""
        momentum = self.config.teacher_momentum
        for teacher, student in zip(
            self.teacher_head.parameters(), self.student_head.parameters(), strict=True
        ):
            teacher.lerp_(student.detach(), 1.0 - momentum)

    # Inference -------------------------------------------------------------------------

    def cams(self, images: torch.Tensor, aux: bool = False) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, h, w) CAMs on the token grid, before ReLU."""
        output = self.backbone(images, intermediate_blocks=(self.aux_block,) if aux else ())
        if aux:
            return self.aux_classifier.cams(output.patch_map(output.intermediate[self.aux_block]))
        return self.classifier.cams(output.patch_map())

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C + 1, h, w) segmentation logits on the token grid."""
        return self.seg_head(self.backbone(images).patch_map())

    @torch.no_grad()
    def multi_scale_cams(
        self, images: torch.Tensor, scales: tuple[float, ...], aux: bool = False
    ) -> torch.Tensor:
        """Normalised CAMs at the images' size (ToCo's ``multi_scale_cam``): per scale
        resized, max with the flip's, ReLU; summed; min-max per class.
        (B, 3, H, W) -> (B, C, H, W) float32."""
        return normalize_cams(
            self._flip_max_cam_sum(lambda x: self.cams(x, aux).float(), images, scales)
        )

    def _flip_max_cam_sum(self, forward, images: torch.Tensor, scales) -> torch.Tensor:
        """Sum over ``scales`` of ReLU(max(CAM, flipped CAM)), each resized to the images
        first: ToCo's order (ReLU after the flip max, per scale). 0 for no scales."""
        return sum(
            multi_scale_flip_inference(
                forward,
                images,
                scales=(scale,),
                flip=True,
                flip_merge="max",
                size_divisor=self.backbone.patch_size,
            ).relu()
            for scale in scales
        )

    @torch.no_grad()
    def multi_scale_segment(self, images: torch.Tensor, scales: tuple[float, ...]) -> torch.Tensor:
        """Segmentation logits at the images' size, summed over scales and flips.
        (B, 3, H, W) -> (B, C + 1, H, W) float32."""
        return multi_scale_flip_inference(
            lambda x: self.segment(x).float(),
            images,
            scales=scales,
            flip=True,
            flip_merge="sum",
            size_divisor=self.backbone.patch_size,
        )

    # Training --------------------------------------------------------------------------

    def training_step(self, batch: dict[str, torch.Tensor], iteration: int) -> StepOutput:
        """ToCo's losses on one batch.

        ``batch`` holds ``image`` (B, 3, S, S) normalised crops, ``label`` (B, C),
        ``valid_box`` (B, 4) and ``global_views`` (B, 1, 3, S, S) (one
        RandomResizedCrop per image). Masks are never read.
        """
        config = self.config
        images, image_labels = batch["image"], batch["label"]
        batch_size, _, height, width = images.shape
        valid = box_mask(batch["valid_box"], (height, width))

        # One encoder pass for the crop and its second global view (CTC's teachers).
        views = torch.cat([images, batch["global_views"][:, 0]])
        output = self.backbone(views, intermediate_blocks=(self.aux_block,))
        token_map = output.patch_map()[:batch_size]
        aux_map = output.patch_map(output.intermediate[self.aux_block])[:batch_size]

        pooling = self.pooling(iteration)
        logits = self.classifier.logits(token_map, pooling)
        aux_logits = self.aux_classifier.logits(aux_map, pooling)
        seg_logits = self.seg_head(token_map)

        cams, aux_cams = self._pseudo_label_cams(images, token_map.detach(), aux_map.detach())

        # PTC: final tokens against token labels from the aux CAM.
        token_labels = resize_labels(
            cams_to_labels(
                aux_cams, image_labels, config.high_threshold, config.low_threshold, valid
            ),
            output.grid,
        )
        ptc = token_contrast_loss(output.patch_tokens[:batch_size], token_labels.flatten(1))

        # CTC: global views (always positive) and ROI-guided local crops.
        roi = roi_map(aux_cams, image_labels, config.high_threshold, config.low_threshold)
        local_crops, local_positive = sample_local_crops(
            images, roi, config.local_crop_count, config.local_crop_size, config.negative_roi_ratio
        )
        local_tokens = self.backbone(local_crops.flatten(0, 1)).class_token
        global_tokens = output.class_token.view(2, batch_size, -1).transpose(0, 1)  # (B, 2, D)
        student = self.student_head(
            torch.cat(
                [global_tokens, local_tokens.view(batch_size, config.local_crop_count, -1)], 1
            )
        )
        with torch.no_grad():
            teacher = self.teacher_head(global_tokens.detach())
        positive = torch.cat([torch.ones_like(local_positive[:, :2]), local_positive], dim=1)
        ctc = class_token_contrast_loss(teacher, student, positive, config.ctc_temperature)

        # Segmentation on PAR-refined CAM labels.
        label_cams = cams if iteration >= config.main_cam_labels_iter else aux_cams
        seg_labels = refine_labels_with_par(
            self.normalization.denormalize(images.detach().float()),
            label_cams,
            image_labels,
            config.high_threshold,
            config.low_threshold,
            valid,
            downscale=config.par_downscale,
            dilations=config.par_dilations,
            iterations=config.par_iterations,
            color_temperature=config.par_color_temperature,
            position_weight=config.par_position_weight,
            ignore_index=IGNORE_INDEX,
        )
        seg_logits = F.interpolate(
            seg_logits, size=(height, width), mode="bilinear", align_corners=False
        )
        seg = segmentation_loss(seg_logits, seg_labels)

        return self.combine_losses(
            iteration, logits, aux_logits, image_labels, ptc, ctc, seg, seg_labels
        )

    def pooling(self, iteration: int) -> str:
        """The classifiers' global pooling at ``iteration``: "avg" before
        ``max_pooling_iter``, then "max"."""
        return "max" if iteration >= self.config.max_pooling_iter else "avg"

    def combine_losses(
        self, iteration, logits, aux_logits, image_labels, ptc, ctc, seg, seg_labels
    ) -> StepOutput:
        """ToCo's loss schedule: the classification terms from ``logits`` and
        ``aux_logits`` (B, C), and the weighted sum with the 0-d ``ptc``, ``ctc``, ``seg``."""
        config = self.config
        contrast_on = iteration >= config.contrast_start_iter
        terms = {
            "cls": F.multilabel_soft_margin_loss(logits.float(), image_labels),
            "cls_aux": F.multilabel_soft_margin_loss(aux_logits.float(), image_labels),
            "ptc": ptc.float(),
            "ctc": ctc,
            "seg": seg,
        }
        weights = {
            "cls": 1.0,
            "cls_aux": 1.0,
            "ptc": config.ptc_weight if contrast_on else 0.0,
            "ctc": config.ctc_weight if contrast_on else 0.0,
            "seg": config.seg_weight if iteration >= config.seg_start_iter else 0.0,
        }
        # Zero weights still multiply: every parameter gets a gradient (DDP needs it).
        total = sum(weights[name] * value for name, value in terms.items())
        return StepOutput(total, terms, weights, seg_labels)

    @torch.no_grad()
    def _pseudo_label_cams(
        self, images: torch.Tensor, token_map: torch.Tensor, aux_map: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Multi-scale + flip CAMs (main, aux) of the crops, normalised, (B, C, S, S).

        The unflipped scale-1 maps come from the training pass (``token_map``,
        ``aux_map``, detached); only the other views are encoded, in eval mode so
        normalisation statistics and drop-path stay those of training.
        """
        size = images.shape[-2:]

        def both_cams(token_map, aux_map):
            main = self.classifier.cams(token_map)
            aux = self.aux_classifier.cams(aux_map)
            return torch.cat([main, aux], dim=1).float()

        def resized(maps):
            return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)

        def encode(views):
            output = self.backbone(views, intermediate_blocks=(self.aux_block,))
            return both_cams(
                output.patch_map(), output.patch_map(output.intermediate[self.aux_block])
            )

        was_training = self.training
        self.eval()
        try:
            unflipped = resized(both_cams(token_map, aux_map))
            flipped = resized(encode(images.flip(-1))).flip(-1)
            other_scales = [scale for scale in self.config.cam_scales if scale != 1.0]
            total = F.relu(torch.maximum(unflipped, flipped)) + self._flip_max_cam_sum(
                encode, images, other_scales
            )
        finally:
            self.train(was_training)
        cams = normalize_cams(total)
        return cams[:, : self.num_classes], cams[:, self.num_classes :]


def sample_local_crops(
    images: torch.Tensor,
    roi: torch.Tensor,
    count: int,
    size: int,
    negative_ratio: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ToCo's ROI-guided local crops, for all images at once.

    Centres are drawn without replacement among the pixels with ROI <= 1 (uncertain or
    background) at least ``size // 2`` from the border, or anywhere when fewer than
    ``count`` qualify; each crop is the ``size`` x ``size`` window centred there (zero
    padding beyond the image). A crop is negative when its mean ROI is <= ``negative_ratio``.

    Args:
        images: (B, 3, H, W); roi: (B, H, W) int64 with values 0, 1, 2.

    Returns crops (B, count, 3, size, size) and positive flags (B, count) bool.
    """
    batch, _, height, width = images.shape
    margin = size // 2
    rows = torch.arange(height, device=images.device)[:, None]
    columns = torch.arange(width, device=images.device)[None, :]
    inside = (
        (rows >= margin)
        & (rows < height - margin)
        & (columns >= margin)
        & (columns < width - margin)
    )
    candidates = (roi <= 1) & inside
    enough = candidates.flatten(1).sum(1) >= count
    candidates = torch.where(enough[:, None, None], candidates, torch.ones_like(candidates))
    # Random distinct candidates: the top-``count`` of random scores, non-candidates last.
    scores = torch.rand(batch, height * width, device=images.device)
    scores = scores.masked_fill(~candidates.flatten(1), -1.0)
    centres = scores.topk(count, dim=1).indices  # (B, count)
    centre_rows, centre_columns = centres // width, centres % width

    # Windows in the zero-padded image start at the centre (offset by the padding).
    offsets = torch.arange(size, device=images.device)
    window_rows = (centre_rows[..., None] + offsets)[..., :, None]  # (B, count, size, 1)
    window_columns = (centre_columns[..., None] + offsets)[..., None, :]  # (B, count, 1, size)
    image_index = torch.arange(batch, device=images.device)[:, None, None, None]
    padded_images = F.pad(images, (margin, size - margin, margin, size - margin))
    crops = padded_images.permute(0, 2, 3, 1)[image_index, window_rows, window_columns]
    padded_roi = F.pad(roi, (margin, size - margin, margin, size - margin))
    roi_means = padded_roi[image_index, window_rows, window_columns].float().mean(dim=(2, 3))
    positive = roi_means > negative_ratio
    return crops.permute(0, 1, 4, 2, 3).contiguous(), positive
