"""One config system for every method: nested dataclasses, YAML files, ``key=value``.

A run's config is built in layers, each overriding the one before:

1. the dataclass defaults below (the reference values of methods.md: ToCo on VOC);
2. a YAML file (``--config``, or ``configs/<method>_<dataset>.yaml`` when one exists);
3. the trainer's flags (``--iters``, ``--batch-size``, ...);
4. ``key=value`` overrides with dotted keys (``toco.ptc_weight=0.3``), values parsed as
   YAML (``optim.lr=1e-4``, ``eval.cam_scales=[1.0,0.5]``).

Unknown keys and values of the wrong type raise ValueError naming the key, so a typo
never trains with a silent default.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wsss_fast.data.synthetic import SyntheticConfig
from wsss_fast.data.transforms import TrainAugmentationConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
METHODS = ("toco", "weaktr", "pixel_sup", "apc")
DATASETS = ("synthetic", "voc", "coco")


@dataclass
class DataConfig:
    """Which data and how it is read.

    ``dataset`` is ``synthetic`` (generated on first use into the cache), ``voc``,
    ``coco``, or ``folder`` (any folder in VOC layout at ``root``).
    """

    dataset: str = "synthetic"
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    num_workers: int = 2
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self):
        if self.dataset not in (*DATASETS, "folder"):
            raise ValueError(
                f"data.dataset must be one of {(*DATASETS, 'folder')}, got {self.dataset!r}"
            )
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")


@dataclass
class ModelConfig:
    """The backbone (any timm ViT) and the shared heads.

    ``pretrained`` is a local weights file (loaded through timm), ``hub`` for the
    backbone's default timm hub weights, or None for random initialisation.
    ``aux_layer`` indexes the blocks like Python (-3: block 10 of 12).
    """

    backbone: str = "vit_base_patch16_224"
    pretrained: str | None = None
    drop_path_rate: float = 0.0
    aux_layer: int = -3
    seg_head_channels: int = 512
    seg_head_dilation: int = 5


@dataclass
class ToCoConfig:
    """ToCo's numbers (methods.md, section 1); defaults are the VOC recipe."""

    cam_scales: tuple[float, ...] = (1.0, 0.5, 1.5)
    # Global pooling of the classifiers: "max" (ToCo) or "avg" before ``max_pooling_iter``.
    max_pooling_iter: int = 0
    high_threshold: float = 0.7
    low_threshold: float = 0.25
    # Loss weights; the segmentation term is off before ``seg_start_iter``.
    ptc_weight: float = 0.2
    ctc_weight: float = 0.5
    seg_weight: float = 0.1
    seg_start_iter: int = 2000
    # COCO: classification alone before ``contrast_start_iter``; segmentation
    # pseudo-labels come from the aux CAM before ``main_cam_labels_iter``.
    contrast_start_iter: int = 0
    main_cam_labels_iter: int = 0
    # Class-token contrast (CTC).
    local_crop_count: int = 8
    local_crop_size: int = 96
    negative_roi_ratio: float = 0.2
    projection_hidden_dim: int = 2048
    projection_bottleneck_dim: int = 256
    projection_out_dim: int = 1024
    teacher_momentum: float = 0.9
    ctc_temperature: float = 0.5
    # Pixel-adaptive refinement (PAR) of the segmentation pseudo-labels.
    par_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    par_iterations: int = 10
    par_color_temperature: float = 0.3
    par_position_weight: float = 0.01
    par_downscale: int = 2

    def __post_init__(self):
        if not 0 <= self.low_threshold < self.high_threshold <= 1:
            raise ValueError(
                "toco thresholds must satisfy 0 <= low_threshold < high_threshold <= 1, got "
                f"{self.low_threshold}, {self.high_threshold}"
            )
        if not self.cam_scales or min(self.cam_scales) <= 0 or 1.0 not in self.cam_scales:
            raise ValueError(
                f"toco.cam_scales must be positive and include 1.0, got {self.cam_scales}"
            )
        if self.local_crop_count < 1 or self.local_crop_size < 1:
            raise ValueError("toco.local_crop_count and toco.local_crop_size must be >= 1")
        if not 0 <= self.teacher_momentum < 1:
            raise ValueError(
                f"toco.teacher_momentum must be in [0, 1), got {self.teacher_momentum}"
            )
        if self.ctc_temperature <= 0:
            raise ValueError(f"toco.ctc_temperature must be > 0, got {self.ctc_temperature}")


@dataclass
class APCConfig:
    """APC's numbers (methods.md, section 4); defaults are the VOC recipe.

    methods.md gives the pooling's gamma and K_max, the confidence threshold and the
    margin; it gives no loss weights, equivariance transform or segmentation schedule:
    those are our choices (see ``wsss_fast.methods.apc``).
    """

    # Adaptive-K pooling: K = clamp(#{s >= gamma * max s}, 1, pooling_k_max_ratio * N).
    pooling_gamma: float = 0.5
    pooling_k_max_ratio: float = 0.25
    # Patches whose (present-class) probability reaches this are pseudo-labelled: PCL's
    # token labels, and the segmentation labels after PAR; the rest are ignored.
    confidence_threshold: float = 0.7
    pcl_margin: float = 0.0
    # Loss weights; the segmentation term is off before ``seg_start_iter``.
    bce_weight: float = 1.0
    pcl_weight: float = 0.2
    equivariance_weight: float = 0.1
    seg_weight: float = 0.1
    seg_start_iter: int = 2000
    # The equivariance view: a random zoom (> 1 zooms in) with a random shift, flipped
    # horizontally with ``equivariance_flip_probability``.
    equivariance_scale_range: tuple[float, float] = (0.75, 1.5)
    equivariance_flip_probability: float = 0.5
    # The segmenter: "seg_head" (a LargeFOV head trained on PAR-refined patch labels) or
    # "patch_classifier" (the patch softmax itself; no head, no PAR, no segmentation term).
    segmenter: str = "seg_head"
    # Pixel-adaptive refinement (PAR) of the segmentation pseudo-labels (ToCo's values).
    par_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    par_iterations: int = 10
    par_color_temperature: float = 0.3
    par_position_weight: float = 0.01
    par_downscale: int = 2

    def __post_init__(self):
        if self.pooling_gamma < 0:
            raise ValueError(f"apc.pooling_gamma must be >= 0, got {self.pooling_gamma}")
        if not 0 < self.pooling_k_max_ratio <= 1:
            raise ValueError(
                f"apc.pooling_k_max_ratio must be in (0, 1], got {self.pooling_k_max_ratio}"
            )
        if not 0 <= self.confidence_threshold <= 1:
            raise ValueError(
                f"apc.confidence_threshold must be in [0, 1], got {self.confidence_threshold}"
            )
        for name in ("bce_weight", "pcl_weight", "equivariance_weight", "seg_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"apc.{name} must be >= 0, got {getattr(self, name)}")
        if self.seg_start_iter < 0:
            raise ValueError(f"apc.seg_start_iter must be >= 0, got {self.seg_start_iter}")
        low, high = self.equivariance_scale_range
        if not 0 < low <= high:
            raise ValueError(
                "apc.equivariance_scale_range must satisfy 0 < low <= high, got "
                f"{self.equivariance_scale_range}"
            )
        if not 0 <= self.equivariance_flip_probability <= 1:
            raise ValueError(
                "apc.equivariance_flip_probability must be in [0, 1], got "
                f"{self.equivariance_flip_probability}"
            )
        if self.segmenter not in ("seg_head", "patch_classifier"):
            raise ValueError(
                f"apc.segmenter must be seg_head or patch_classifier, got {self.segmenter!r}"
            )
        if self.par_downscale < 1 or self.par_iterations < 0 or not self.par_dilations:
            raise ValueError(
                "apc.par_downscale must be >= 1, apc.par_iterations >= 0 and "
                "apc.par_dilations non-empty"
            )


@dataclass
class PixelSupConfig:
    """Pixel-level self-supervision's numbers (methods.md, section 3: our ViT adaptation
    of Yoon et al. 2021, which has no public code). Defaults: the VOC recipe. The numbers
    methods.md gives are its; the loss weights, start iterations, projection width and
    pooling are ours (methods.md gives none); the pseudo-label thresholds and PAR are
    ToCo's."""

    # SupportNet, the EMA of MainNet.
    support_momentum: float = 0.999
    # SupportNet CAM scales, max-fused: the MAM target, the RCM masks, the pseudo-labels.
    cam_scales: tuple[float, ...] = (0.5, 1.0, 1.5)
    # RCM: class region masks from the fused CAM, InfoNCE against the batch's prototypes.
    foreground_threshold: float = 0.5
    background_threshold: float = 0.2
    contrast_temperature: float = 0.1
    projection_dim: int = 256  # ours: the 1x1 projection of the tokens the RCM contrasts
    pooling: str = "max"  # ours: the classifier's global pooling ("max" as ToCo, or "avg")
    # Loss weights (ours); RCM and MAM are off before ``self_supervision_start_iter``,
    # segmentation before ``seg_start_iter`` (the CAMs must mean something first).
    rcm_weight: float = 0.1
    mam_weight: float = 0.1  # spreads CAMs over whole images on synthetic data (docstring)
    self_supervision_start_iter: int = 2000
    seg_weight: float = 0.1
    seg_start_iter: int = 2000
    # Segmentation pseudo-labels as ToCo's: PAR-refined fused CAM, high/low background.
    high_threshold: float = 0.7
    low_threshold: float = 0.25
    par_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    par_iterations: int = 10
    par_color_temperature: float = 0.3
    par_position_weight: float = 0.01
    par_downscale: int = 2

    def __post_init__(self):
        if not 0 <= self.support_momentum < 1:
            raise ValueError(
                f"pixel_sup.support_momentum must be in [0, 1), got {self.support_momentum}"
            )
        if not self.cam_scales or min(self.cam_scales) <= 0 or 1.0 not in self.cam_scales:
            raise ValueError(
                f"pixel_sup.cam_scales must be positive and include 1.0, got {self.cam_scales}"
            )
        if not 0 <= self.background_threshold <= self.foreground_threshold <= 1:
            raise ValueError(
                "pixel_sup thresholds must satisfy 0 <= background_threshold <= "
                f"foreground_threshold <= 1, got {self.background_threshold}, "
                f"{self.foreground_threshold}"
            )
        if not 0 <= self.low_threshold < self.high_threshold <= 1:
            raise ValueError(
                "pixel_sup thresholds must satisfy 0 <= low_threshold < high_threshold <= 1, "
                f"got {self.low_threshold}, {self.high_threshold}"
            )
        if self.contrast_temperature <= 0:
            raise ValueError(
                f"pixel_sup.contrast_temperature must be > 0, got {self.contrast_temperature}"
            )
        if self.projection_dim < 1:
            raise ValueError(f"pixel_sup.projection_dim must be >= 1, got {self.projection_dim}")
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"pixel_sup.pooling must be 'max' or 'avg', got {self.pooling!r}")


@dataclass
class WeakTrSegmentationConfig:
    """WeakTr's step 2 (methods.md, section 2): the segmenter retrained on the step-1
    pseudo-masks, with its own schedule, batch, crops and evaluation. Defaults: the VOC
    recipe; ``iters`` and the decoder's width and dropout are not in methods.md (ours:
    20k iterations as ToCo's VOC run; Segmenter's decoder, width = the encoder's, 64-wide
    heads, dropout 0.1, drop-path 0.1)."""

    iters: int = 20000
    batch_size: int = 4
    drop_path_rate: float = 0.1
    decoder_depth: int = 2
    decoder_head_dim: int = 64
    decoder_mlp_ratio: float = 4.0
    decoder_dropout: float = 0.1
    # Gradient clipping: no clipping while the batch-mean loss is above ``clip_threshold``,
    # else every pixel's loss is capped at the mean of its ``clip_window`` square window
    # (the windows tile the crop), floored at the batch mean.
    clip_threshold: float = 1.2
    clip_window: int = 120
    augmentation: TrainAugmentationConfig = field(
        default_factory=lambda: TrainAugmentationConfig(crop_size=480)
    )
    # SGD, momentum 0.9, lr 1e-4 poly for the decoder, x0.1 for the encoder.
    optim: "OptimConfig" = field(
        default_factory=lambda: OptimConfig(
            name="sgd",
            lr=1e-5,
            head_lr_multiplier=10.0,
            weight_decay=0.0,
            momentum=0.9,
            schedule="poly",
            warmup_iters=0,
        )
    )
    # Multi-scale 0.5-1.75 + flips, then the CRF (crf.md's WeakTr set).
    eval: "EvalConfig" = field(
        default_factory=lambda: EvalConfig(
            seg_scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
            crf_gaussian=(3.0, 3.0),
            crf_bilateral=(83.0, 5.0, 3.0),
        )
    )

    def __post_init__(self):
        for name in ("iters", "batch_size", "decoder_head_dim", "clip_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"weaktr.seg.{name} must be >= 1, got {getattr(self, name)}")
        if self.decoder_depth < 0:
            raise ValueError(f"weaktr.seg.decoder_depth must be >= 0, got {self.decoder_depth}")
        if self.clip_threshold < 0:
            raise ValueError(f"weaktr.seg.clip_threshold must be >= 0, got {self.clip_threshold}")


@dataclass
class WeakTrConfig:
    """WeakTr's numbers (methods.md, section 2); defaults are the VOC recipe.

    The top-level run settings (``iters``, ``batch_size``, ``optim``, ``augmentation``,
    ``eval``) are step 1's, the CAM network; ``seg`` holds step 2's. ``step`` says which
    network ``build_method`` makes: the trainer sets it per step. The fusion's reductions
    (64 -> 8 -> 1 per head feature) and the label CRF's gt_prob (0.7, as IRN/AFA) are
    not in methods.md: the reference code's values.
    """

    step: str = "cam"
    class_token_loss_weight: float = 1.0
    coarse_cam_loss_weight: float = 1.0
    fine_cam_loss_weight: float = 1.0
    # Adaptive attention fusion: token pooling, per-head feature MLP reduction, SE reduction.
    fusion_pooling: str = "max"
    fusion_feature_reduction: int = 8
    fusion_reduction: int = 8
    # Pseudo-masks after step 1: scales (+ flips) summed, masked, min-max, constant
    # background, argmax, then the CRF from labels.
    pseudo_label_scales: tuple[float, ...] = (1.0, 1.2)
    background_threshold: float = 0.43
    crf_gt_prob: float = 0.7
    crf_gaussian: tuple[float, float] = (3.0, 3.0)
    crf_bilateral: tuple[float, float, float] = (83.0, 5.0, 3.0)
    crf_iterations: int = 10
    seg: WeakTrSegmentationConfig = field(default_factory=WeakTrSegmentationConfig)

    def __post_init__(self):
        if self.step not in ("cam", "seg"):
            raise ValueError(f"weaktr.step must be 'cam' or 'seg', got {self.step!r}")
        if self.fusion_pooling not in ("max", "avg"):
            raise ValueError(
                f"weaktr.fusion_pooling must be 'max' or 'avg', got {self.fusion_pooling!r}"
            )
        if self.fusion_feature_reduction < 1 or self.fusion_reduction < 1:
            raise ValueError("weaktr.fusion_feature_reduction and fusion_reduction must be >= 1")
        if not self.pseudo_label_scales or min(self.pseudo_label_scales) <= 0:
            raise ValueError(
                f"weaktr.pseudo_label_scales must be positive, got {self.pseudo_label_scales}"
            )
        if not 0 <= self.background_threshold <= 1:
            raise ValueError(
                f"weaktr.background_threshold must be in [0, 1], got {self.background_threshold}"
            )
        if not 0 < self.crf_gt_prob < 1:
            raise ValueError(f"weaktr.crf_gt_prob must be in (0, 1), got {self.crf_gt_prob}")
        if self.crf_iterations < 0:
            raise ValueError(f"weaktr.crf_iterations must be >= 0, got {self.crf_iterations}")


@dataclass
class OptimConfig:
    """The optimizer and its schedule; defaults are ToCo's PolyWarmupAdamW.

    ``name`` is ``adamw`` or ``sgd`` (with ``momentum``). The schedule warms up
    linearly from ``warmup_ratio * lr`` over ``warmup_iters``, then decays: ``poly``
    as ``(1 - iteration / iters) ** poly_power``, or ``cosine`` from ``lr`` to
    ``min_lr_ratio * lr`` over the iterations after the warm-up. Heads train at
    ``head_lr_multiplier`` times the backbone's rate.
    """

    name: str = "adamw"
    lr: float = 6e-5
    head_lr_multiplier: float = 10.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    schedule: str = "poly"
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    poly_power: float = 0.9
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        if self.name not in ("adamw", "sgd"):
            raise ValueError(f"optim.name must be adamw or sgd, got {self.name!r}")
        if self.schedule not in ("poly", "cosine"):
            raise ValueError(f"optim.schedule must be poly or cosine, got {self.schedule!r}")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_iters < 0:
            raise ValueError(f"optim.warmup_iters must be >= 0, got {self.warmup_iters}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class EvalConfig:
    """Evaluation on the val split and the pictures written with it.

    ``cam_background`` is the constant background score the CAMs compete with when
    they are turned into labels for scoring; the CRF parameter sets are crf.md's
    (ToCo's final segmentation: Gaussian 1/1, bilateral 121/5/4).
    """

    interval: int = 2000
    batch_size: int = 1
    cam_scales: tuple[float, ...] = (1.0,)
    cam_background: float = 0.45
    seg_scales: tuple[float, ...] = (1.0,)
    crf_gaussian: tuple[float, float] = (1.0, 1.0)
    crf_bilateral: tuple[float, float, float] = (121.0, 5.0, 4.0)
    crf_iterations: int = 10
    overlay_count: int = 8
    max_images: int | None = None

    def __post_init__(self):
        if self.interval < 1 or self.batch_size < 1:
            raise ValueError("eval.interval and eval.batch_size must be >= 1")


@dataclass
class TrainConfig:
    """Everything a run needs; ``method`` picks which method section is used."""

    method: str = "toco"
    iters: int = 20000
    batch_size: int = 4  # per process
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast, on CUDA only
    log_interval: int = 20
    checkpoint_interval: int = 500
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # ToCo's class-token contrast takes one RandomResizedCrop view per image.
    augmentation: TrainAugmentationConfig = field(
        default_factory=lambda: TrainAugmentationConfig(global_view_count=1)
    )
    optim: OptimConfig = field(default_factory=OptimConfig)
    toco: ToCoConfig = field(default_factory=ToCoConfig)
    pixel_sup: PixelSupConfig = field(default_factory=PixelSupConfig)
    apc: APCConfig = field(default_factory=APCConfig)
    weaktr: WeakTrConfig = field(default_factory=WeakTrConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("iters", "batch_size", "log_interval", "checkpoint_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.method == "toco" and self.augmentation.global_view_count != 1:
            raise ValueError(
                "toco needs augmentation.global_view_count = 1 (the second global view of "
                f"its class-token contrast), got {self.augmentation.global_view_count}"
            )


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """``value`` (from YAML) as ``annotation`` says, recursing into dataclasses."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0] if errors else f"{key}: cannot convert {value!r}")
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return from_dict(annotation, value, prefix=f"{key}.")
    if origin is tuple:
        arguments = typing.get_args(annotation)
        if not isinstance(value, list | tuple):
            raise ValueError(f"{key} must be a list, got {value!r}")
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return tuple(_convert(item, arguments[0], key) for item in value)
        if len(value) != len(arguments):
            raise ValueError(f"{key} must hold {len(arguments)} values, got {value!r}")
        return tuple(_convert(item, kind, key) for item, kind in zip(value, arguments, strict=True))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config annotation {annotation!r}")


def from_dict(cls: type, values: dict, prefix: str = "") -> Any:
    """Builds dataclass ``cls`` from a (nested) dict; unknown keys raise ValueError."""
    hints = typing.get_type_hints(cls)
    names = {item.name for item in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(prefix + name for name in unknown)}; "
            f"{prefix or 'top level '}knows {', '.join(sorted(names))}"
        )
    converted = {
        name: _convert(value, hints[name], prefix + name) for name, value in values.items()
    }
    return cls(**converted)


def to_dict(config: Any) -> dict:
    """A dataclass as plain nested dicts and lists (YAML- and JSON-ready)."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {
                item.name: plain(getattr(value, item.name)) for item in dataclasses.fields(value)
            }
        if isinstance(value, tuple | list):
            return [plain(item) for item in value]
        return value

    return plain(config)


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge: ``update`` wins; nested mappings merge key by key."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict:
    """``"a.b.c=value"`` -> ``{"a": {"b": {"c": value}}}``, the value parsed as YAML."""
    key, separator, raw_value = text.partition("=")
    if not separator or not key.strip():
        raise ValueError(f"override {text!r} must look like key=value (e.g. optim.lr=1e-4)")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError as error:
        raise ValueError(f"override {text!r}: the value is not valid YAML ({error})") from None
    # YAML 1.1 reads "1e-4" as a string; a float is what anyone writing it means.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    nested: dict = value
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


def load_yaml(path: str | Path) -> dict:
    """A YAML config file as a dict (empty file: empty dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path) as file:
        values = yaml.safe_load(file) or {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level")
    return values


def default_config_file(method: str, dataset: str) -> Path | None:
    """``configs/<method>_<dataset>.yaml`` when it exists."""
    path = CONFIG_DIR / f"{method}_{dataset}.yaml"
    return path if path.is_file() else None


def build_config(layers: list[dict]) -> TrainConfig:
    """Merges the layers (first lowest) over the defaults into a checked TrainConfig."""
    merged = to_dict(TrainConfig())
    for layer in layers:
        merged = merge(merged, layer)
    return from_dict(TrainConfig, merged)


def save_yaml(config: Any) -> str:
    """The config as YAML text (what ``load_yaml`` + ``build_config`` read back)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)
