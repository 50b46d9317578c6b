"""Pixel-level self-supervision with a MainNet and a SupportNet (methods.md, section 3).

Yoon et al. 2021, "Exploring Pixel-level Self-supervision for Weakly Supervised Semantic
Segmentation", has no public code: what follows is OUR ViT adaptation of the paper's
abstract, not a reimplementation of the authors' network. Single stage, as ToCo.

- MainNet, the trained network: a ViT, a token classifier (CAMs, multilabel soft-margin
  loss), a bias-free 1x1 projection of the final patch tokens (the pixel features the
  RCM trains) and a LargeFOV segmentation head on the patch-token map.
- SupportNet: the EMA of MainNet's backbone, classifier and projection (``after_step``,
  one vectorised ``torch._foreach_lerp_`` over the parameter lists, buffers copied). It
  never receives a gradient, runs under no_grad and always in eval mode.
- Multi-scale SupportNet CAMs: one SupportNet pass per scale of ``cam_scales``; each
  CAM is resized to the crop, min-max normalised per image and class, and the scales
  are max-fused. The scale-1 pass also gives the SupportNet features. This one fused
  map serves three purposes: the MAM target, the RCM region masks (both area-pooled to
  the token grid) and the segmentation pseudo-labels (PAR-refined as ToCo).
- RCM, regional contrastive module: region labels per token from the fused CAM
  (``cams_to_labels``: the image's class with the largest CAM where it is above
  ``foreground_threshold``, background where every class of the image is at or below
  ``background_threshold``, else unlabelled); one prototype per class (background
  included) per batch: the mask-average of the SupportNet features over the batch's
  tokens of that class, L2-normalised. Every labelled MainNet feature (L2-normalised)
  takes an InfoNCE over the batch's prototypes (temperature ``contrast_temperature``),
  its own class's being the positive.
- MAM, multi-scale attentive module: MainNet's scale-1 CAM, normalised as the target
  (ReLU, min-max per image and class, the minimum and range taken as constants for
  autograd), is pulled toward the fused target only where the target is larger: mean
  of max(target - cam, 0) over the image's classes and the crop's valid tokens. Tokens
  whose CAM is <= 0 get no pull: expansion happens into weakly positive regions. (An
  earlier variant without the ReLU, dividing by the peak magnitude, pulled the negative
  background up too and drove the CAMs to cover whole images on the synthetic data.)
  The pull feeds back on itself: the max over scales is at least the SupportNet's own
  scale-1 CAM, which follows MainNet's, so the target stays above the CAM and rises
  with it. On the synthetic data nothing holds the expansion back (max pooling ignores
  everything below the peak) and the CAMs spread over whole images within a few
  hundred iterations at weight 0.1; restricting the pull to the target's class region,
  a two-sided L1 and an added push-down where the target is background did not stop
  it. The synthetic recipe therefore turns MAM off (configs/pixel_sup_synthetic.yaml
  lists the measurements); on real data, where CAMs are too small rather than too
  large, the term is meant to expand them, and ``mam_weight`` sets how hard.

Our choices where the abstract says nothing: the projection (so the contrast shapes the
backbone without forcing the classifier's own token space onto the prototypes), one
prototype per class per batch rather than per image (every class present anywhere in the
batch is a negative for every token, and an image with a single class still has
negatives), CAM normalisation before the MAM comparison (target and CAM on one scale;
raw CAMs would just keep inflating both networks' magnitudes), the loss weights and the
start iteration of the self-supervision (config fields, ``PixelSupConfig``). At
inference MainNet gives the CAMs and the segmentation.

Against the faults of the WSSS reference code: no repeated encoder pass of an image by
the same network (the SupportNet's scale-1 pass gives CAM and features, and its fused
CAMs are the pseudo-labels too); the segmentation loss is 0 with zero gradient on a fully
ignored crop; the RCM loss is 0 with zero gradient when no token has a region label;
the valid box masks every loss.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from wsss_fast.config import ModelConfig, PixelSupConfig
from wsss_fast.data.palette import IGNORE_INDEX
from wsss_fast.data.transforms import Normalization, multi_scale_flip_inference
from wsss_fast.methods.base import StepOutput, WSSSMethod
from wsss_fast.methods.cam import box_mask, cams_to_labels, normalize_cams, refine_labels_with_par
from wsss_fast.methods.losses import segmentation_loss
from wsss_fast.models.backbone import ViTBackbone
from wsss_fast.models.heads import LargeFOVHead, TokenClassifier

_NORMALIZE_EPS = 1e-5  # as normalize_cams: an all-zero CAM stays at zero


class TokenProjection(nn.Module):
    """A bias-free 1x1 projection of patch tokens: (B, N, D) -> (B, N, E)."""

    def __init__(self, embed_dim: int, projection_dim: int):
        super().__init__()
        self.linear = nn.Linear(embed_dim, projection_dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(tokens)


class SupportNet(nn.Module):
    """The EMA copies of MainNet's backbone, classifier and projection: no gradient,
    always in eval mode (no drop-path), whatever ``train()`` the trainer calls."""

    def __init__(self, backbone: ViTBackbone, classifier: TokenClassifier, projection):
        super().__init__()
        self.backbone = copy.deepcopy(backbone)
        self.classifier = copy.deepcopy(classifier)
        self.projection = copy.deepcopy(projection)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "SupportNet":
        return super().train(False)


class PixelSup(WSSSMethod):
    """MainNet + SupportNet with the RCM and MAM losses and a segmentation head.

    Args:
        model_config: backbone and head settings.
        config: the method's numbers.
        num_classes: C, the foreground classes (the seg head predicts C + 1).
        crop_size: the training crop (position embedding size at creation).
        normalization: how images are normalised (PAR needs them de-normalised); by
            default the backbone's own pretrained config.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        config: PixelSupConfig,
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
        self.classifier = TokenClassifier(width, num_classes)
        self.projection = TokenProjection(width, config.projection_dim)
        self.seg_head = LargeFOVHead(
            width, num_classes + 1, model_config.seg_head_channels, model_config.seg_head_dilation
        )
        self.support = SupportNet(self.backbone, self.classifier, self.projection)

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone parameters, head parameters): heads train at a higher rate; the
        SupportNet is not trained."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        heads = [
            p
            for module in (self.classifier, self.projection, self.seg_head)
            for p in module.parameters()
            if p.requires_grad
        ]
        return backbone, heads

    def _main_and_support(self) -> list[tuple[nn.Module, nn.Module]]:
        return [
            (self.backbone, self.support.backbone),
            (self.classifier, self.support.classifier),
            (self.projection, self.support.projection),
        ]

    @torch.no_grad()
    def after_step(self) -> None:
        """SupportNet <- momentum * SupportNet + (1 - momentum) * MainNet, one vectorised
        lerp over all parameters; buffers copied."""
        main_parameters, support_parameters, main_buffers, support_buffers = [], [], [], []
        for main, support in self._main_and_support():
            main_parameters.extend(main.parameters())
            support_parameters.extend(support.parameters())
            main_buffers.extend(main.buffers())
            support_buffers.extend(support.buffers())
        torch._foreach_lerp_(
            support_parameters,
            [p.detach() for p in main_parameters],
            1.0 - self.config.support_momentum,
        )
        if main_buffers:
            torch._foreach_copy_(support_buffers, main_buffers)

    # Inference -------------------------------------------------------------------------

    def cams(self, images: torch.Tensor) -> torch.Tensor:
        """MainNet's (B, 3, H, W) -> (B, C, h, w) CAMs on the token grid, before ReLU."""
        return self.classifier.cams(self.backbone(images).patch_map())

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C + 1, h, w) segmentation logits on the token grid."""
        return self.seg_head(self.backbone(images).patch_map())

    @torch.no_grad()
    def multi_scale_cams(self, images: torch.Tensor, scales: tuple[float, ...]) -> torch.Tensor:
        """MainNet's normalised CAMs at the images' size, as ToCo scores them: per scale
        resized, max with the flip's, ReLU; summed; min-max per class.
        (B, 3, H, W) -> (B, C, H, W) float32."""
        total = sum(
            multi_scale_flip_inference(
                lambda x: self.cams(x).float(),
                images,
                scales=(scale,),
                flip=True,
                flip_merge="max",
                size_divisor=self.backbone.patch_size,
            ).relu()
            for scale in scales
        )
        return normalize_cams(total)

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

    @torch.no_grad()
    def support_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SupportNet's fused multi-scale CAMs (B, C, S, S) float32 in [0, 1] (per scale
        resized to the crop and min-max normalised, then max over the scales) and its
        scale-1 features (B, N, E), from one pass per scale."""
        size = images.shape[-2:]
        support = self.support
        fused, features = None, None
        for scale in self.config.cam_scales:
            scaled = images
            if scale != 1.0:
                scaled_size = [scaled_side(side, scale, self.backbone.patch_size) for side in size]
                scaled = F.interpolate(
                    images, size=scaled_size, mode="bilinear", align_corners=False
                )
            output = support.backbone(scaled)
            if scale == 1.0:
                features = support.projection(output.patch_tokens)
            cams = support.classifier.cams(output.patch_map()).float()
            cams = normalize_cams(
                F.interpolate(cams, size=size, mode="bilinear", align_corners=False)
            )
            fused = cams if fused is None else torch.maximum(fused, cams)
        return fused, features

    def training_step(self, batch: dict[str, torch.Tensor], iteration: int) -> StepOutput:
        """The method's losses on one batch: ``image`` (B, 3, S, S) normalised crops,
        ``label`` (B, C), ``valid_box`` (B, 4). Masks are never read."""
        config = self.config
        images, image_labels = batch["image"], batch["label"]
        _, _, height, width = images.shape
        valid = box_mask(batch["valid_box"], (height, width))

        output = self.backbone(images)
        token_map = output.patch_map()
        logits = self.classifier.logits(token_map, config.pooling)
        main_cams = self.classifier.cams(token_map)
        features = self.projection(output.patch_tokens)
        seg_logits = self.seg_head(token_map)

        support_cams, support_features = self.support_outputs(images)
        token_cams = F.interpolate(support_cams, size=output.grid, mode="area")
        valid_tokens = token_valid_mask(valid, output.grid)

        region_labels = cams_to_labels(
            token_cams,
            image_labels,
            config.foreground_threshold,
            config.background_threshold,
            valid_tokens,
        )
        rcm = prototype_contrast_loss(
            features,
            support_features,
            region_labels.flatten(1),
            self.num_classes,
            config.contrast_temperature,
        )
        mam = multi_scale_attention_loss(
            normalize_cams_fixed_range(main_cams), token_cams, image_labels, valid_tokens
        )

        seg_labels = refine_labels_with_par(
            self.normalization.denormalize(images.detach().float()),
            support_cams,
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
        return self.combine_losses(iteration, logits, image_labels, rcm, mam, seg, seg_labels)

    def combine_losses(
        self, iteration, logits, image_labels, rcm, mam, seg, seg_labels
    ) -> StepOutput:
        """The loss schedule: classification from ``logits`` (B, C) always; the 0-d
        ``rcm`` and ``mam`` from ``self_supervision_start_iter``, ``seg`` from
        ``seg_start_iter``."""
        config = self.config
        self_supervised = iteration >= config.self_supervision_start_iter
        terms = {
            "cls": F.multilabel_soft_margin_loss(logits.float(), image_labels),
            "rcm": rcm,
            "mam": mam,
            "seg": seg,
        }
        weights = {
            "cls": 1.0,
            "rcm": config.rcm_weight if self_supervised else 0.0,
            "mam": config.mam_weight if self_supervised else 0.0,
            "seg": config.seg_weight if iteration >= config.seg_start_iter else 0.0,
        }
        # Zero weights still multiply: every parameter gets a gradient (DDP needs it).
        total = sum(weights[name] * value for name, value in terms.items())
        return StepOutput(total, terms, weights, seg_labels)


def scaled_side(side: int, scale: float, patch_size: int) -> int:
    """A side rescaled and rounded (halves up) to a multiple of the patch size, at least
    one patch: the size ``multi_scale_flip_inference`` gives the same scale."""
    return max(patch_size, int(side * scale / patch_size + 0.5) * patch_size)


def token_valid_mask(valid: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) bool pixels showing the image -> (B, h, w) bool tokens that show any."""
    return F.adaptive_max_pool2d(valid[:, None].float(), grid)[:, 0] > 0


def normalize_cams_fixed_range(cams: torch.Tensor) -> torch.Tensor:
    """``normalize_cams`` (ReLU, min-max per image and class) with the minimum and range
    constants for autograd: (B, C, h, w) -> same, float32, in [0, 1]. A token's gradient
    comes from its own loss term only (none where the CAM is <= 0), and the CAM is on
    the target's scale."""
    cams = F.relu(cams.float())
    low = cams.amin(dim=(2, 3), keepdim=True).detach()
    span = (cams - low).amax(dim=(2, 3), keepdim=True).detach()
    return (cams - low) / (span + _NORMALIZE_EPS)


def multi_scale_attention_loss(
    cams: torch.Tensor, target: torch.Tensor, image_labels: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """MAM: mean of max(target - cams, 0) over the image's classes and valid tokens.

    Args:
        cams: (B, C, h, w) MainNet's normalised CAMs (with gradient).
        target: (B, C, h, w) the SupportNet's fused CAMs (no gradient).
        image_labels: (B, C) multi-hot; valid: (B, h, w) bool.

    The gradient is zero wherever target <= cams; 0 (zero gradient) without any pair.
    Returns a 0-d float32 tensor.
    """
    weight = image_labels[:, :, None, None].float() * valid[:, None].float()
    shortfall = F.relu(target.float() - cams.float()) * weight
    return shortfall.sum() / weight.sum().clamp(min=1)


def prototype_contrast_loss(
    features: torch.Tensor,
    support_features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    temperature: float,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """RCM: InfoNCE of every labelled token feature against the batch's prototypes.

    One prototype per label (0 background, c + 1 class c) present in the batch: the mean
    of the SupportNet features of the batch's tokens with that label, L2-normalised.
    Each labelled MainNet feature, L2-normalised, is scored against every present
    prototype (cosine / temperature); cross-entropy with its own label's prototype as
    the positive, averaged over the labelled tokens.

    Args:
        features: (B, N, E) MainNet features (with gradient).
        support_features: (B, N, E) SupportNet features (no gradient).
        labels: (B, N) int64 region labels in 0..C or ``ignore_index``.

    Returns a 0-d float32 tensor: 0 with zero gradient when no token is labelled.
    """
    labelled = (labels != ignore_index).flatten()
    targets = labels.flatten().masked_fill(~labelled, 0)
    membership = F.one_hot(targets, num_classes + 1).float() * labelled[:, None]  # (BN, C+1)
    support = support_features.flatten(0, 1).float()
    counts = membership.sum(0)
    prototypes = F.normalize((membership.t() @ support) / counts.clamp(min=1)[:, None], dim=-1)
    scores = F.normalize(features.flatten(0, 1).float(), dim=-1) @ prototypes.t() / temperature
    # The most negative float, not -inf: a row without any prototype stays finite.
    scores = scores.masked_fill(counts[None, :] == 0, torch.finfo(scores.dtype).min)
    per_token = F.cross_entropy(scores, targets, reduction="none") * labelled
    return per_token.sum() / labelled.sum().clamp(min=1)
