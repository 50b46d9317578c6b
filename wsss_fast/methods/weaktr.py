"""WeakTr: a plain ViT with adaptive attention fusion, then a gradient-clipping decoder
(Zhu et al., 2023; methods.md section 2).

Two steps, each a full training run of its own network:

1. ``WeakTrCAM``, the CAM network: a ViT with one class token per class (MCTformer's
   layout), a 3x3 conv CAM head on the patch tokens (the coarse CAM), and the adaptive
   attention fusion (AAF): every head of every block gets a weight in (0, 1) from its
   block's attention-branch output (max over tokens, a per-head linear stack, then a
   squeeze-excitation MLP over the L*H heads), and the weighted mean of the L*H
   attention maps gives the class-to-patch attention (times the coarse CAM: the CAMs)
   and the patch-to-patch affinity that propagates them (the fine CAM). Three
   multilabel soft-margin losses, on the class tokens (mean over channels), the
   average-pooled coarse CAM and the average-pooled fine CAM. After training, its
   multi-scale + flip fine CAMs, thresholded against a constant background and refined
   by a CRF from labels, are the pseudo-masks of the whole train split
   (``pseudo_masks``; the trainer writes them).
2. ``WeakTrSegmenter``: the ViT with Segmenter's 2-block mask-transformer decoder,
   trained on those masks with the gradient-clipping loss
   (``gradient_clipped_cross_entropy``), evaluated multi-scale + flip, then CRF.

The trainer runs the steps in order (``WeakTrBuilder.stages``), each into its own
sub-directory of the run.

Gradient flow in step 1, as the reference: the attention maps (queries and keys) and
the attention-branch features the AAF weights are computed from are detached, and so
is the coarse CAM inside the fine CAM; the fine-CAM loss therefore trains the AAF
alone (its gradient reaches the weights through the fused map), the class-token and
coarse-CAM losses train the encoder and the CAM head.

Fixed or changed here, against the reference code:
- the 72 attention maps are never materialised or cloned: the blocks keep their fused
  (SDPA) attention, their queries and keys are captured, and
  ``wsss_fast.ops.fuse_attention_maps`` computes the weighted mean straight from them;
- the segmentation loss is 0 with zero gradient on a fully ignored crop, and the
  clipping windows average over the valid pixels only (ignored pixels count nowhere);
- pseudo-masks are written batched, atomically, resumably, with a progress bar.

Adaptations (our spec): the class tokens are read after the ViT's final norm (the
reference skips the pretrained norm); the per-head features of the AAF are contiguous
64-channel chunks of the projected attention output (the reference interleaves the
channels; both are a fixed split of a linear projection's output); the label CRF
scores all C + 1 classes (pydensecrf's ``unary_from_labels``, ``zero_unsure=False``);
inference skips the sliding window (whole images, resized per scale); RandAugment and
random erasing of the step-1 recipe are not in our data pipeline.
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from wsss_fast.config import ModelConfig, TrainConfig, WeakTrConfig, WeakTrSegmentationConfig
from wsss_fast.data.palette import IGNORE_INDEX
from wsss_fast.data.transforms import Normalization, multi_scale_flip_inference
from wsss_fast.methods.base import StepOutput, TrainingStage, WSSSMethod
from wsss_fast.methods.cam import cams_to_prediction, normalize_cams
from wsss_fast.models.backbone import ClassTokensBackbone, ClassTokensOutput, ViTBackbone
from wsss_fast.models.heads import MaskTransformerDecoder
from wsss_fast.ops import dense_crf, fuse_attention_maps

# Step 1 ------------------------------------------------------------------------------


class AdaptiveAttentionFusion(nn.Module):
    """WeakTr's AAF: per-head weights in (0, 1) from the blocks' attention outputs.

    (B, G, T, d) per-head attention-branch features of the G = L*H heads -> (B, G):
    pooled over the T tokens (max or mean), d -> d / feature_reduction -> 1 per head
    (two linear layers, no activation between, as the reference), then the
    squeeze-excitation MLP G -> G / reduction -> G (no biases) with ReLU and sigmoid.
    """

    def __init__(
        self,
        num_maps: int,
        head_dim: int,
        feature_reduction: int = 8,
        reduction: int = 8,
        pooling: str = "max",
    ):
        super().__init__()
        self.pooling = pooling
        hidden = max(1, head_dim // feature_reduction)
        self.head_score = nn.Sequential(nn.Linear(head_dim, hidden), nn.Linear(hidden, 1))
        squeezed = max(1, num_maps // reduction)
        self.excitation = nn.Sequential(
            nn.Linear(num_maps, squeezed, bias=False),
            nn.ReLU(),
            nn.Linear(squeezed, num_maps, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = features.amax(dim=2) if self.pooling == "max" else features.mean(dim=2)
        return self.excitation(self.head_score(pooled).squeeze(-1))


def head_features(attention_outputs: list[torch.Tensor], num_heads: int) -> torch.Tensor:
    """Per-block (B, T, D) attention outputs -> (B, L*H, T, D/H) per-head features,
    layer-major (the order of the captured queries and keys)."""
    per_block = [
        output.unflatten(-1, (num_heads, -1)).transpose(1, 2) for output in attention_outputs
    ]
    return torch.cat(per_block, dim=1)


class WeakTrCAM(WSSSMethod):
    """WeakTr's step 1: the CAM network with adaptive attention fusion.

    Args:
        model_config: backbone settings (``drop_path_rate``: the recipe's 0.1).
        config: WeakTr's numbers.
        num_classes: C, foreground classes (= class tokens).
        crop_size: the training crop (position embedding size at creation).
        normalization: how images are normalised; the backbone's own by default.
    """

    outputs = ("cams",)

    def __init__(
        self,
        model_config: ModelConfig,
        config: WeakTrConfig,
        num_classes: int,
        crop_size: int,
        normalization: Normalization | None = None,
    ):
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.backbone = ClassTokensBackbone(
            model_config.backbone,
            num_classes,
            model_config.pretrained,
            img_size=crop_size,
            drop_path_rate=model_config.drop_path_rate,
        )
        self.normalization = normalization or Normalization.from_timm(self.backbone.vit)
        attention = self.backbone.vit.blocks[0].attn
        self.num_heads = attention.num_heads
        self.attention_scale = float(attention.scale)
        self.cam_head = nn.Conv2d(self.backbone.embed_dim, num_classes, 3, padding=1)
        self.attention_fusion = AdaptiveAttentionFusion(
            self.backbone.num_blocks * self.num_heads,
            attention.head_dim,
            config.fusion_feature_reduction,
            config.fusion_reduction,
            config.fusion_pooling,
        )

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        heads = [
            p
            for module in (self.cam_head, self.attention_fusion)
            for p in module.parameters()
            if p.requires_grad
        ]
        return backbone, heads

    def forward_cams(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """One encoder pass: ``class_logits`` (B, C), ``coarse_cam`` (B, C, h, w) before
        ReLU, ``fine_cam`` (B, C, h, w) and ``fusion_weights`` (B, L*H)."""
        output = self.backbone(images)
        coarse_cam = self.cam_head(output.patch_map())
        fused, weights = self.fused_attention(output)
        return {
            "class_logits": output.class_tokens.mean(dim=-1),
            "coarse_cam": coarse_cam,
            "fine_cam": fine_cam_from_fused(fused, coarse_cam, self.num_classes, output.grid),
            "fusion_weights": weights,
        }

    def fused_attention(self, output: ClassTokensOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """The AAF-weighted mean attention map (B, T, T) and the weights (B, L*H).

        Queries, keys and the AAF's input features are detached: only the AAF's own
        parameters get a gradient, through the weights."""
        features = head_features([o.detach() for o in output.attention_outputs], self.num_heads)
        weights = self.attention_fusion(features)
        queries = torch.cat(output.queries, dim=1).detach()
        keys = torch.cat(output.keys, dim=1).detach()
        fused = fuse_attention_maps(
            queries, keys, weights.to(queries.dtype), scale=self.attention_scale
        )
        return fused, weights

    def training_step(self, batch: dict[str, torch.Tensor], iteration: int) -> StepOutput:
        """The three classification losses on ``image`` (B, 3, S, S) and ``label`` (B, C)."""
        maps = self.forward_cams(batch["image"])
        return self.combine_losses(maps, batch["label"])

    def combine_losses(self, maps: dict[str, torch.Tensor], image_labels) -> StepOutput:
        config = self.config
        terms = {
            "cls": F.multilabel_soft_margin_loss(maps["class_logits"].float(), image_labels),
            "coarse": F.multilabel_soft_margin_loss(
                maps["coarse_cam"].float().mean(dim=(2, 3)), image_labels
            ),
            "fine": F.multilabel_soft_margin_loss(
                maps["fine_cam"].float().mean(dim=(2, 3)), image_labels
            ),
        }
        weights = {
            "cls": config.class_token_loss_weight,
            "coarse": config.coarse_cam_loss_weight,
            "fine": config.fine_cam_loss_weight,
        }
        total = sum(weights[name] * value for name, value in terms.items())
        return StepOutput(total, terms, weights)

    @torch.no_grad()
    def multi_scale_cams(self, images: torch.Tensor, scales: tuple[float, ...]) -> torch.Tensor:
        """Fine CAMs summed over ``scales`` and flips, min-max per class.
        (B, 3, H, W) -> (B, C, H, W) float32 in [0, 1]."""
        summed = multi_scale_flip_inference(
            lambda x: self.forward_cams(x)["fine_cam"].float(),
            images,
            scales=scales,
            flip=True,
            flip_merge="sum",
            size_divisor=self.backbone.patch_size,
        )
        return normalize_cams(summed)

    @torch.no_grad()
    def pseudo_masks(self, images: torch.Tensor, image_labels: torch.Tensor) -> torch.Tensor:
        """Step 1's pseudo-masks: (B, 3, H, W) normalised images and (B, C) labels ->
        (B, H, W) int64 labels in [0, C] (CRF-refined, nothing ignored)."""
        config = self.config
        cams = self.multi_scale_cams(images, config.pseudo_label_scales)
        labels = cams_to_prediction(cams, image_labels, config.background_threshold)
        uint8_images = (self.normalization.denormalize(images.float()) * 255.0).round()
        return crf_from_labels(
            uint8_images.to(torch.uint8),
            labels,
            self.num_classes + 1,
            config.crf_gt_prob,
            gaussian=config.crf_gaussian,
            bilateral=config.crf_bilateral,
            iterations=config.crf_iterations,
        )


def fine_cam_from_fused(
    fused: torch.Tensor, coarse_cam: torch.Tensor, num_classes: int, grid: tuple[int, int]
) -> torch.Tensor:
    """WeakTr's fine CAM: cams = class-to-patch block of ``fused`` * ReLU(coarse CAM)
    (detached), propagated by the patch-to-patch block.

    ``fused`` (B, C + N, C + N), ``coarse_cam`` (B, C, h, w) -> (B, C, h, w)."""
    cross_attention = fused[:, :num_classes, num_classes:]  # (B, C, N)
    patch_attention = fused[:, num_classes:, num_classes:]  # (B, N, N)
    cams = cross_attention * F.relu(coarse_cam.detach()).flatten(2).to(fused.dtype)
    fine = cams @ patch_attention.transpose(1, 2)  # fine[c, i] = sum_j A[i, j] cams[c, j]
    return fine.unflatten(-1, grid)


def crf_from_labels(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_labels: int,
    gt_prob: float,
    *,
    gaussian: tuple[float, float],
    bilateral: tuple[float, float, float],
    iterations: int,
) -> torch.Tensor:
    """A dense CRF from label maps (pydensecrf's ``unary_from_labels`` with
    ``zero_unsure=False``: the label gets -log(gt_prob), every other label
    -log((1 - gt_prob) / (num_labels - 1))), batched, on the inputs' device.

    ``images`` (B, 3, H, W) uint8, ``labels`` (B, H, W) int64 in [0, num_labels) ->
    (B, H, W) int64, the argmax of the marginals.
    """
    other = (1.0 - gt_prob) / (num_labels - 1)
    probabilities = torch.full(
        (labels.shape[0], num_labels, *labels.shape[1:]), other, device=labels.device
    )
    probabilities.scatter_(1, labels[:, None], gt_prob)
    # dense_crf's unary is -log(probabilities): exactly the energies above.
    refined = dense_crf(
        images, probabilities, gaussian=gaussian, bilateral=bilateral, iterations=iterations
    )
    return refined.argmax(dim=1)


# Step 2 ------------------------------------------------------------------------------


def gradient_clipped_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    window: int,
    threshold: float,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """WeakTr's gradient-clipping loss.

    Per-pixel cross-entropy, mean m over the valid pixels. If m > ``threshold`` the
    loss is m. Otherwise each pixel's loss is capped at max(mean loss of its
    ``window`` x ``window`` tile, m) (the tiles cover the map from the top-left corner;
    a tile's mean is over its valid pixels), the cap detached so capped pixels give no
    gradient; the loss is the mean of the capped losses. 0 with zero gradient when
    every pixel is ignored.

    Args:
        logits: (B, K, H, W) float; labels: (B, H, W) int64 (``ignore_index`` ignored).

    Returns a 0-d float32 tensor.
    """
    valid = labels != ignore_index
    per_pixel = F.cross_entropy(
        logits.float(), labels.masked_fill(~valid, 0), reduction="none"
    ).masked_fill(~valid, 0.0)
    count = valid.sum().clamp(min=1)
    batch_mean = per_pixel.sum() / count

    height, width = labels.shape[-2:]
    pad = (0, -width % window, 0, -height % window)
    tile_losses = F.pad(per_pixel.detach(), pad)
    tile_valid = F.pad(valid.float(), pad)
    tiles = (tile_losses.shape[1] // window, window, tile_losses.shape[2] // window, window)
    tile_sums = tile_losses.unflatten(1, tiles[:2]).unflatten(3, tiles[2:]).sum(dim=(2, 4))
    tile_counts = tile_valid.unflatten(1, tiles[:2]).unflatten(3, tiles[2:]).sum(dim=(2, 4))
    tile_means = tile_sums / tile_counts.clamp(min=1)
    caps = torch.maximum(tile_means, batch_mean.detach())
    caps = caps.repeat_interleave(window, 1).repeat_interleave(window, 2)[:, :height, :width]
    clipped_mean = torch.minimum(per_pixel, caps).sum() / count
    return torch.where(batch_mean > threshold, batch_mean, clipped_mean)


class WeakTrSegmenter(WSSSMethod):
    """WeakTr's step 2: ViT encoder + Segmenter mask-transformer decoder, trained on the
    step-1 pseudo-masks (``mask`` in the batch) with the gradient-clipping loss.

    Args:
        model_config: backbone settings.
        config: step 2's numbers (``WeakTrConfig.seg``).
        num_classes: C (the decoder predicts C + 1).
        crop_size: the training crop.
        normalization: the backbone's own by default.
    """

    outputs = ("segmentation",)

    def __init__(
        self,
        model_config: ModelConfig,
        config: WeakTrSegmentationConfig,
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
        self.decoder = MaskTransformerDecoder(
            width,
            num_classes + 1,
            width,
            config.decoder_depth,
            max(1, width // config.decoder_head_dim),
            config.decoder_mlp_ratio,
            config.decoder_dropout,
            model_config.drop_path_rate,
        )

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        return backbone, [p for p in self.decoder.parameters() if p.requires_grad]

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C + 1, h, w) mask logits on the token grid."""
        output = self.backbone(images)
        return self.decoder(output.patch_tokens, output.grid)

    def training_step(self, batch: dict[str, torch.Tensor], iteration: int) -> StepOutput:
        """The gradient-clipped cross-entropy of ``image`` (B, 3, S, S) against its
        augmented pseudo-mask ``mask`` (B, S, S) (255 on padding)."""
        images, masks = batch["image"], batch["mask"]
        logits = F.interpolate(
            self.segment(images), size=images.shape[-2:], mode="bilinear", align_corners=False
        )
        loss = gradient_clipped_cross_entropy(
            logits, masks, self.config.clip_window, self.config.clip_threshold
        )
        return StepOutput(loss, {"seg": loss}, {"seg": 1.0}, masks)

    @torch.no_grad()
    def multi_scale_segment(self, images: torch.Tensor, scales: tuple[float, ...]) -> torch.Tensor:
        """Logits summed over scales and flips: (B, 3, H, W) -> (B, C + 1, H, W) float32."""
        return multi_scale_flip_inference(
            lambda x: self.segment(x).float(),
            images,
            scales=scales,
            flip=True,
            flip_merge="sum",
            size_divisor=self.backbone.patch_size,
        )


# The two steps for the trainer --------------------------------------------------------

PSEUDO_MASK_FOLDER = "pseudo_labels"


def step_config(config: TrainConfig, step: str) -> TrainConfig:
    """The run config of one step: step 1 is the top-level config, step 2 takes its
    iterations, batch, optimizer, augmentation, evaluation and drop-path from
    ``weaktr.seg``."""
    weaktr = dataclasses.replace(config.weaktr, step=step)
    if step == "cam":
        return dataclasses.replace(config, weaktr=weaktr)
    seg = config.weaktr.seg
    return dataclasses.replace(
        config,
        iters=seg.iters,
        batch_size=seg.batch_size,
        optim=seg.optim,
        augmentation=seg.augmentation,
        eval=seg.eval,
        model=dataclasses.replace(config.model, drop_path_rate=seg.drop_path_rate),
        weaktr=weaktr,
    )


class WeakTrBuilder:
    """The ``BUILDERS`` entry: builds the network of ``config.weaktr.step``;
    ``stages`` declares the two steps to the trainer."""

    def __call__(self, config: TrainConfig, num_classes: int) -> WSSSMethod:
        crop_size = config.augmentation.crop_size
        if config.weaktr.step == "cam":
            return WeakTrCAM(config.model, config.weaktr, num_classes, crop_size)
        return WeakTrSegmenter(config.model, config.weaktr.seg, num_classes, crop_size)

    def stages(self, config: TrainConfig) -> list[TrainingStage]:
        return [
            TrainingStage("cam", step_config(config, "cam"), writes_masks=PSEUDO_MASK_FOLDER),
            TrainingStage("seg", step_config(config, "seg"), reads_masks=PSEUDO_MASK_FOLDER),
        ]
