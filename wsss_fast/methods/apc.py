"""APC, adaptive patch contrast for WSSS (Wu et al., 2024; methods.md section 4).

A CAM-free patch classifier in one stage: a bias-free linear layer D -> C + 1 on every
final patch token, softmax per patch over background and the C classes, is both the
classifier and the pseudo-label maker. It is trained by

- BCE on image scores pooled from the patch probabilities by adaptive-K pooling (AKP):
  per class the mean of the K highest patch probabilities, K = clamp(number of patches
  >= gamma * max, 1, K_max), the gradient reaching only those K patches;
- patch contrastive learning (PCL): cosine similarities of the L2-normalised final patch
  tokens, pairs with the same confident patch label pulled to 1, pairs with different
  labels pushed below a margin (the fused token-similarity op of ToCo's PTC, without
  the absolute value);
- an equivariance loss (ViT-PCM's): the patch predictions of a zoomed, shifted and
  flipped view against the same transform applied to the image's own predictions;
- and, with ``segmenter: seg_head`` (the default, as in the other single-stage methods
  here), a LargeFOV segmentation head trained on the patch predictions refined by PAR;
  with ``segmenter: patch_classifier`` the patch softmax itself is the segmenter.

APC publishes no code and methods.md gives no exact formulas; our choices:
- the background channel is pooled too, with target 1 for every image (background is
  always present, as in ViT-PCM), so it learns to win somewhere in every image;
- pseudo-labels (PCL's and the segmentation's) use the softmax over background and the
  image's own classes only (absent classes at -inf); a patch is labelled when that
  probability reaches ``confidence_threshold`` and lies in the crop's valid box;
- equivariance: L1 between probability maps on the token grid (summed over the C + 1
  classes, averaged over the positions the transformed view shows), no side detached
  (as in ViT-PCM's and SEAM's regulariser: both views learn to agree); the transform is
  a random zoom in ``equivariance_scale_range`` with a random shift that keeps zoomed-in
  windows inside the image, and a horizontal flip;
- loss weights (methods.md gives none): BCE 1, PCL 0.2 (ToCo's PTC weight), segmentation
  0.1 from ``seg_start_iter`` (ToCo's), equivariance 0.1 - measured on the synthetic
  recipe (300 iterations, with the seg head; CAM / seg mIoU): equivariance weight 1 held the
  classifier back (30.8 / 16.1), 0.25 less (53.2 / 39.2), 0.1 not (61.4 / 46.0, the
  same as without the term: 61.3 / 46.0, so on this data it neither helps nor hurts);
  PCL off (at equivariance weight 1) was slightly worse (30.0 / 13.7);
- the segmenter: the seg head on VOC and COCO (the single-stage design of the other
  methods; not measured there); the patch classifier on the synthetic default, where
  on the same 300-iteration checkpoints it scored seg mIoU 51.8 (60.6 with CRF) against
  the head's 46.0 (48.4) at equivariance 0.1, and 43.5 (49.1) against 39.2 (41.0) at
  0.25: the head learns from labels no better than the patches' own predictions;
- evaluation CAMs are the foreground patch probabilities, multi-scale + flip (summed),
  min-max normalised per class.

Against the structure of the predecessors' code (ViT-PCM encodes the image and its
transformed view in separate passes and sorts every row for top-K pooling): the image
and its transformed view go through the encoder in one batched pass, AKP and PCL run
as fused ops, PAR is batched, and the segmentation loss is 0 with zero gradient on a
fully ignored crop (never NaN).
"""

import torch
import torch.nn.functional as F
from torch import nn

from wsss_fast.config import APCConfig, ModelConfig
from wsss_fast.data.palette import IGNORE_INDEX
from wsss_fast.data.transforms import Normalization, multi_scale_flip_inference
from wsss_fast.methods.base import StepOutput, WSSSMethod
from wsss_fast.methods.cam import box_mask, normalize_cams, resize_labels
from wsss_fast.methods.losses import segmentation_loss
from wsss_fast.models.backbone import ViTBackbone
from wsss_fast.models.heads import LargeFOVHead
from wsss_fast.ops import adaptive_topk_pool, refine_pixel_adaptive, token_contrast_loss

_PROBABILITY_EPS = 1e-6  # keeps log(p) and log(1 - p) of the BCE finite


class APC(WSSSMethod):
    """APC's network and training losses.

    Args:
        model_config: backbone and head settings.
        config: APC's numbers.
        num_classes: C, the foreground classes (the patch classifier predicts C + 1).
        crop_size: the training crop (position embedding size at creation).
        normalization: how images are normalised (PAR needs them de-normalised); by
            default the backbone's own pretrained config.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        config: APCConfig,
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
        width = self.backbone.embed_dim
        # Background first, as in the segmentation logits.
        self.patch_classifier = nn.Linear(width, num_classes + 1, bias=False)
        self.seg_head = None
        if config.segmenter == "seg_head":
            self.seg_head = LargeFOVHead(
                width,
                num_classes + 1,
                model_config.seg_head_channels,
                model_config.seg_head_dilation,
            )

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone parameters, head parameters): heads train at a higher rate."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        heads = [
            p
            for module in (self.patch_classifier, self.seg_head)
            if module is not None
            for p in module.parameters()
            if p.requires_grad
        ]
        return backbone, heads

    # Building blocks ---------------------------------------------------------------------

    def patch_logits(self, patch_tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, N, D) final patch tokens -> (B, C + 1, h, w) float32 patch logits."""
        logits = self.patch_classifier(patch_tokens).float()
        return logits.transpose(1, 2).reshape(logits.shape[0], -1, *grid)

    def pooling_k_max(self, num_patches: int) -> int:
        """AKP's K_max for N patches: ``pooling_k_max_ratio`` * N, at least 1 (any crop)."""
        return max(1, round(self.config.pooling_k_max_ratio * num_patches))

    def image_scores(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Adaptive-K pooling: (B, C + 1, h, w) patch probabilities -> (B, C + 1) image
        scores, the gradient reaching only each row's K selected patches."""
        scores = probabilities.flatten(2)
        return adaptive_topk_pool(
            scores,
            gamma=self.config.pooling_gamma,
            k_max=self.pooling_k_max(scores.shape[-1]),
        )

    def present_class_probabilities(
        self, logits: torch.Tensor, image_labels: torch.Tensor
    ) -> torch.Tensor:
        """Softmax over background and the image's classes only: (B, C + 1, h, w) logits,
        (B, C) labels -> (B, C + 1, h, w) float32, 0 for absent classes. No gradient."""
        present = torch.cat([torch.ones_like(image_labels[:, :1]), image_labels], dim=1) > 0
        masked = logits.detach().float().masked_fill(~present[:, :, None, None], float("-inf"))
        return masked.softmax(dim=1)

    def confident_labels(self, probabilities: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) probabilities, (B, h, w) bool valid -> (B, h, w) int64 argmax labels,
        ``IGNORE_INDEX`` below ``confidence_threshold`` or outside ``valid``."""
        confidence, labels = probabilities.max(dim=1)
        confident = (confidence >= self.config.confidence_threshold) & valid
        return torch.where(confident, labels, IGNORE_INDEX)

    # Inference ---------------------------------------------------------------------------

    def patch_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C + 1, h, w) float32 patch probabilities."""
        output = self.backbone(images)
        return self.patch_logits(output.patch_tokens, output.grid).softmax(dim=1)

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C + 1, h, w) the seg head's logits on the token grid (with
        ``segmenter: seg_head``)."""
        return self.seg_head(self.backbone(images).patch_map())

    @torch.no_grad()
    def multi_scale_cams(self, images: torch.Tensor, scales: tuple[float, ...]) -> torch.Tensor:
        """The foreground patch probabilities at the images' size, summed over scales and
        flips, min-max per class. (B, 3, H, W) -> (B, C, H, W) float32 in [0, 1)."""
        summed = multi_scale_flip_inference(
            lambda x: self.patch_probabilities(x)[:, 1:],
            images,
            scales=scales,
            flip=True,
            flip_merge="sum",
            size_divisor=self.backbone.patch_size,
        )
        return normalize_cams(summed.float())

    @torch.no_grad()
    def multi_scale_segment(self, images: torch.Tensor, scales: tuple[float, ...]) -> torch.Tensor:
        """Segmentation logits at the images' size. (B, 3, H, W) -> (B, C + 1, H, W) float32.

        The seg head's logits summed over scales and flips; with ``segmenter:
        patch_classifier`` the log of the patch probabilities summed over scales and flips
        (the softmax of summed logits would be a sharpened product, which the CRF barely
        moves: on the synthetic default, CRF mIoU 55.1 against 62.9).
        """
        if self.seg_head is None:
            summed = multi_scale_flip_inference(
                self.patch_probabilities,
                images,
                scales=scales,
                flip=True,
                flip_merge="sum",
                size_divisor=self.backbone.patch_size,
            )
            return summed.float().clamp_min(_PROBABILITY_EPS).log()
        return multi_scale_flip_inference(
            lambda x: self.segment(x).float(),
            images,
            scales=scales,
            flip=True,
            flip_merge="sum",
            size_divisor=self.backbone.patch_size,
        )

    # Training ----------------------------------------------------------------------------

    def training_step(self, batch: dict[str, torch.Tensor], iteration: int) -> StepOutput:
        """APC's losses on one batch (``image`` (B, 3, S, S) normalised crops, ``label``
        (B, C), ``valid_box`` (B, 4)). Masks are never read. The equivariance transform
        is drawn from torch's global RNG (seeded per iteration by the trainer)."""
        config = self.config
        images, image_labels = batch["image"], batch["label"]
        batch_size, _, height, width = images.shape
        valid = box_mask(batch["valid_box"], (height, width))
        theta = random_zoom_flip(
            batch_size,
            config.equivariance_scale_range,
            config.equivariance_flip_probability,
            images.device,
        )

        # One encoder pass for the crops and their transformed views.
        views = torch.cat([images, warp(images, theta)])
        output = self.backbone(views)
        logits = self.patch_logits(output.patch_tokens, output.grid)
        probabilities, view_probabilities = logits.softmax(dim=1).split(batch_size)
        image_logits = logits[:batch_size]

        bce = image_score_bce(self.image_scores(probabilities), image_labels)

        label_probabilities = self.present_class_probabilities(image_logits, image_labels)
        token_labels = self.confident_labels(label_probabilities, resize_labels(valid, output.grid))
        pcl = token_contrast_loss(
            output.patch_tokens[:batch_size],
            token_labels.flatten(1),
            absolute=False,
            margin=config.pcl_margin,
        )

        equivariance = equivariance_loss(probabilities, view_probabilities, theta)

        if self.seg_head is None:
            return self.combine_losses(iteration, bce, pcl, equivariance)
        seg_labels = self.segmentation_labels(images, label_probabilities, valid)
        seg_logits = self.seg_head(output.patch_map()[:batch_size])
        seg_logits = F.interpolate(
            seg_logits, size=(height, width), mode="bilinear", align_corners=False
        )
        seg = segmentation_loss(seg_logits, seg_labels)
        return self.combine_losses(iteration, bce, pcl, equivariance, seg, seg_labels)

    @torch.no_grad()
    def segmentation_labels(
        self, images: torch.Tensor, label_probabilities: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Patch predictions refined by PAR at ``1 / par_downscale`` of the crop, then
        confident labels at the crop's size. (B, 3, S, S) normalised images,
        (B, C + 1, h, w) present-class probabilities, (B, S, S) valid -> (B, S, S) int64."""
        config = self.config
        size = images.shape[-2:]
        small = (size[0] // config.par_downscale, size[1] // config.par_downscale)
        rgb = self.normalization.denormalize(images.detach().float())
        small_images = F.interpolate(rgb, size=small, mode="bilinear", align_corners=False)
        small_probabilities = F.interpolate(
            label_probabilities, size=small, mode="bilinear", align_corners=False
        )
        refined = refine_pixel_adaptive(
            small_images,
            small_probabilities,
            dilations=config.par_dilations,
            iterations=config.par_iterations,
            w_color=config.par_color_temperature,
            w_pos=config.par_position_weight,
        )
        refined = F.interpolate(refined, size=size, mode="bilinear", align_corners=False)
        return self.confident_labels(refined, valid)

    def combine_losses(
        self, iteration, bce, pcl, equivariance, seg=None, seg_labels=None
    ) -> StepOutput:
        """The weighted sum of the 0-d terms; segmentation (when there is a seg head)
        from ``seg_start_iter``."""
        config = self.config
        terms = {"bce": bce, "pcl": pcl.float(), "equivariance": equivariance}
        weights = {
            "bce": config.bce_weight,
            "pcl": config.pcl_weight,
            "equivariance": config.equivariance_weight,
        }
        if seg is not None:
            terms["seg"] = seg
            weights["seg"] = config.seg_weight if iteration >= config.seg_start_iter else 0.0
        # Zero weights still multiply: every parameter gets a gradient (DDP needs it).
        total = sum(weights[name] * value for name, value in terms.items())
        return StepOutput(total, terms, weights, seg_labels)


def image_score_bce(scores: torch.Tensor, image_labels: torch.Tensor) -> torch.Tensor:
    """BCE of pooled (B, C + 1) probabilities against (B, C) labels with background
    (channel 0) always present; mean over images and channels, 0-d float32. Written out
    (not ``F.binary_cross_entropy``, which autocast refuses) with clamped logs."""
    targets = torch.cat([torch.ones_like(image_labels[:, :1]), image_labels], dim=1).float()
    scores = scores.float()
    log_positive = scores.clamp_min(_PROBABILITY_EPS).log()
    log_negative = (1.0 - scores).clamp_min(_PROBABILITY_EPS).log()
    return -(targets * log_positive + (1.0 - targets) * log_negative).mean()


def random_zoom_flip(
    batch: int,
    scale_range: tuple[float, float],
    flip_probability: float,
    device: torch.device,
) -> torch.Tensor:
    """Random affine transforms for ``warp``: (B, 2, 3) float32 sampling matrices.

    Per image a zoom s uniform in ``scale_range`` (> 1 zooms in), a shift uniform within
    what keeps a zoomed-in window inside the image (none when zooming out) and a
    horizontal flip with ``flip_probability``; drawn from torch's global RNG.
    """
    low, high = scale_range
    scale = low + (high - low) * torch.rand(batch, device=device)
    flip = torch.rand(batch, device=device) < flip_probability
    inverse = 1.0 / scale
    room = (1.0 - inverse).clamp_min(0.0)
    shift = (2.0 * torch.rand(batch, 2, device=device) - 1.0) * room[:, None]
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0] = torch.where(flip, -inverse, inverse)
    theta[:, 1, 1] = inverse
    theta[:, :, 2] = shift
    return theta


def warp(maps: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Applies (B, 2, 3) sampling matrices (normalised coordinates, so the same transform
    at any resolution) to (B, K, H, W) maps, bilinear, zeros outside."""
    grid = F.affine_grid(theta.to(maps.dtype), list(maps.shape), align_corners=False)
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def equivariance_loss(
    probabilities: torch.Tensor, view_probabilities: torch.Tensor, theta: torch.Tensor
) -> torch.Tensor:
    """L1 between the transformed view's predictions and the transformed predictions.

    Args:
        probabilities: (B, K, h, w) patch probabilities of the images.
        view_probabilities: (B, K, h, w) those of the views ``warp(images, theta)``.
        theta: (B, 2, 3) the views' transforms.

    Summed over the K classes, averaged over the view's positions weighted by how much
    of them shows the image (zoomed-out borders show none). 0-d float32; both inputs
    get gradients.
    """
    probabilities = probabilities.float()
    target = warp(probabilities, theta)
    shown = warp(torch.ones_like(probabilities[:, :1]), theta)
    distance = (view_probabilities.float() - target).abs().sum(dim=1, keepdim=True)
    return (distance * shown).sum() / shown.sum().clamp_min(1.0)
