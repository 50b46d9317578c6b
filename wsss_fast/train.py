"""The trainer: ``python -m wsss_fast.train``.

With no arguments it trains ToCo on the built-in synthetic dataset (generated into the
cache on first use) with the small convolutional-stem ViT the package ships, on
whatever device is there. Flags pick the method, data, backbone, config file and
more; any config field can be overridden with ``key=value`` (see ``wsss_fast.config``).

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (training
logs and evaluations), ``checkpoints/latest.pt`` and ``checkpoints/best.pt`` (written
atomically), ``overlays/`` (pictures after each evaluation) and, at the end,
``final_metrics.json``. ``--resume`` continues a run exactly: model, optimizer,
scheduler, EMA heads and the position in the data are restored, and every random draw
of iteration i comes from generators seeded by (seed, rank, i), so an interrupted and
resumed run makes the same draws as an uninterrupted one.

A method trained in steps (WeakTr: a CAM network, then a segmenter on its
pseudo-masks) declares them through its ``BUILDERS`` entry (``stages``); each step is a
full run of its own in ``<run>/<step>/`` (config, metrics, checkpoints, overlays), the
pseudo-masks go to ``<run>/pseudo_labels/``, and ``<run>/final_metrics.json`` takes each
score from the step that gives it. ``--stage NAME`` runs one step; ``--resume`` continues
whichever step was interrupted (finished steps are skipped, written masks kept).

Multi-GPU and multi-node: ``torchrun --nproc_per_node N -m wsss_fast.train ...`` (NCCL on
GPUs, gloo on CPUs); ``batch_size`` is per process.
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

import wsss_fast.models  # noqa: F401  (registers the package's timm models)
from wsss_fast.checkpoint import atomic_torch_save, load_checkpoint
from wsss_fast.config import (
    DATASETS,
    METHODS,
    OptimConfig,
    TrainConfig,
    build_config,
    default_config_file,
    load_yaml,
    parse_override,
    save_yaml,
    to_dict,
)
from wsss_fast.data import (
    COCOSegmentation,
    EvalTransform,
    SegmentationFolder,
    TrainTransform,
    VOCSegmentation,
    get_or_create_synthetic_dataset,
    read_label_png,
    save_label_png,
)
from wsss_fast.data.cache import atomic_write_text
from wsss_fast.methods import BUILDERS, WSSSMethod, build_method
from wsss_fast.methods.base import TrainingStage
from wsss_fast.methods.cam import cams_to_prediction
from wsss_fast.metrics import SegmentationMetric
from wsss_fast.ops import dense_crf
from wsss_fast.visualize import save_overlay_grid


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the step was not taken."""


# Data ----------------------------------------------------------------------------------


def _keep_arrays(image: np.ndarray, mask: np.ndarray | None) -> dict:
    """A dataset transform that leaves decoding to the caller (module level: picklable)."""
    return {"arrays": (image, mask)}


def open_split(config: TrainConfig, split: str, transform) -> SegmentationFolder:
    """The dataset split ``config.data`` names, read through ``transform``."""
    data = config.data
    if data.dataset == "synthetic":
        root = data.root or get_or_create_synthetic_dataset(data.synthetic)
        return SegmentationFolder(root, split, transform=transform)
    if data.root is None:
        raise ValueError(f"data.root (--data-root) is needed for dataset {data.dataset!r}")
    if data.dataset == "voc":
        return VOCSegmentation(data.root, split, transform=transform)
    if data.dataset == "coco":
        return COCOSegmentation(data.root, split, transform=transform)
    return SegmentationFolder(data.root, split, transform=transform)


class AugmentedSamples(Dataset):
    """Sample key k -> image k mod n of ``dataset``, augmented by a generator seeded with
    (seed, k): a sample's augmentation depends on nothing else (not on workers, not on
    what was loaded before), which makes resumed runs exact. The dataset's masks are
    dropped (the methods train from image-level labels); with ``mask_dir`` the sample's
    ``mask`` is ``<mask_dir>/<name>.png`` (a previous stage's pseudo-mask), augmented
    together with the image."""

    def __init__(
        self,
        dataset: SegmentationFolder,
        transform: TrainTransform,
        seed: int,
        mask_dir: Path | None = None,
    ):
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.mask_dir = mask_dir

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> dict:
        raw = self.dataset[key % len(self.dataset)]
        image, _mask = raw["arrays"]
        mask = None
        if self.mask_dir is not None:
            mask = read_label_png(self.mask_dir / f"{raw['name']}.png")
        generator = torch.Generator().manual_seed(_mix_seed(self.seed, 0x5A17, key))
        sample = self.transform(image, mask, generator)
        sample["label"] = raw["label"]
        return sample


class IterationSampler(Sampler[int]):
    """Sample keys for iterations [start, end) of a run, this process's share.

    Each epoch is a permutation seeded by (seed, epoch); iteration i takes the i-th slice
    of ``batch_size * world_size`` keys (a partial last slice is dropped), and process r
    its r-th ``batch_size`` of them. Keys are epoch * n + index, so augmentations differ
    between epochs.
    """

    def __init__(self, size, batch_size, world_size, rank, seed, start, end):
        self.size, self.batch_size = size, batch_size
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.start, self.end = start, end
        self.per_iteration = batch_size * world_size
        if size < self.per_iteration:
            raise ValueError(
                f"the training split has {size} images, fewer than batch_size x processes "
                f"= {self.per_iteration}"
            )
        self.batches_per_epoch = size // self.per_iteration

    def __len__(self) -> int:
        return (self.end - self.start) * self.batch_size

    def __iter__(self):
        epoch, order = None, None
        for iteration in range(self.start, self.end):
            iteration_epoch, position = divmod(iteration, self.batches_per_epoch)
            if iteration_epoch != epoch:
                epoch = iteration_epoch
                generator = torch.Generator().manual_seed(_mix_seed(self.seed, 0xE90C, epoch))
                order = torch.randperm(self.size, generator=generator).tolist()
            first = position * self.per_iteration + self.rank * self.batch_size
            for index in order[first : first + self.batch_size]:
                yield epoch * self.size + index


def _mix_seed(*values: int) -> int:
    """A 63-bit seed from several integers (SplitMix64 steps): nearby inputs give
    unrelated seeds."""
    state = 0
    for value in values:
        state = (state + 0x9E3779B97F4A7C15 + (value & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        mixed = state
        mixed = ((mixed ^ (mixed >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        mixed = ((mixed ^ (mixed >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        state = mixed ^ (mixed >> 31)
    return state >> 1


def _to_device(batch: dict, device: torch.device) -> dict:
    return {
        key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
    }


# Model, optimizer, schedule -------------------------------------------------------------


def build_optimizer(config: TrainConfig, model: WSSSMethod):
    """The optimizer ``config.optim`` names (backbone at ``lr``, heads at
    ``lr * head_lr_multiplier``) and its schedule over ``config.iters`` (see
    ``OptimConfig``)."""
    optim = config.optim
    backbone, heads = model.parameter_groups()
    groups = [
        {"params": backbone, "lr": optim.lr},
        {"params": heads, "lr": optim.lr * optim.head_lr_multiplier},
    ]
    if optim.name == "sgd":
        optimizer = torch.optim.SGD(
            groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(
            groups, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay
        )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule_factor(optim, step, config.iters)
    )


def schedule_factor(optim: OptimConfig, step: int, iters: int) -> float:
    """The learning-rate multiplier at ``step`` of ``iters``: linear warm-up from
    ``warmup_ratio``, then poly or cosine decay."""
    if step < optim.warmup_iters:
        return 1 - (1 - step / optim.warmup_iters) * (1 - optim.warmup_ratio)
    if optim.schedule == "cosine":
        progress = min(1.0, (step - optim.warmup_iters) / max(1, iters - optim.warmup_iters))
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * cosine
    return max(0.0, 1 - step / iters) ** optim.poly_power


# Evaluation -----------------------------------------------------------------------------


def model_outputs(model: WSSSMethod) -> tuple[str, ...]:
    """What a method's network gives: ``cams`` and/or ``segmentation`` (its ``outputs``
    attribute; both by default). A stage of a multi-step method may give only one."""
    return tuple(getattr(model, "outputs", ("cams", "segmentation")))


@torch.no_grad()
def evaluate(
    model: WSSSMethod,
    loader: DataLoader,
    config: TrainConfig,
    device: torch.device,
    overlay_path: Path | None,
    show_progress: bool,
) -> dict:
    """CAM, segmentation and segmentation + CRF mIoU (percent) on the val split, of what
    the network gives (``model_outputs``): ``cam_*`` keys for CAMs, ``seg_*`` and
    ``seg_crf_*`` for a segmentation at ``eval.seg_scales``, and, when those are several
    scales, ``seg_single_scale_*`` (scale 1 + flip, no CRF) as well: the protocol
    reports both.

    CAMs are masked by the true image labels (the protocol for CAM quality); the
    segmentation never sees labels. Writes the overlay grid of the first
    ``eval.overlay_count`` images to ``overlay_path`` when given (panels a network does
    not give show the other one's prediction).
    """
    num_classes = model.num_classes + 1
    outputs = model_outputs(model)
    evaluation = config.eval
    single_scale = tuple(evaluation.seg_scales) != (1.0,)
    names = (("cam",) if "cams" in outputs else ()) + (
        ("seg", "seg_crf", *(("seg_single_scale",) if single_scale else ()))
        if "segmentation" in outputs
        else ()
    )
    metrics = {name: SegmentationMetric(num_classes, device=device) for name in names}
    overlay_rows: dict[str, list] = {key: [] for key in ("images", "cams", "pseudo", "pred", "gt")}
    was_training = model.training
    model.eval()
    for batch in tqdm(loader, desc="evaluate", leave=False, disable=not show_progress):
        images = batch["image"].to(device)
        masks = batch["mask"].to(device)
        labels = batch["label"].to(device)
        # The CRF's uint8 images, made on the device (no round trip through the host).
        uint8_images = (model.normalization.denormalize(images.float()) * 255.0).round()
        uint8_images = uint8_images.to(torch.uint8)
        predictions = {}
        if "cam" in metrics:
            with autocast_for(config, device):
                cams = model.multi_scale_cams(images, evaluation.cam_scales).float()
            predictions["cam"] = cams_to_prediction(cams, labels, evaluation.cam_background)
            cam_heat = (cams * labels[:, :, None, None]).amax(1)
        if "seg" in metrics:
            with autocast_for(config, device):
                logits = model.multi_scale_segment(images, evaluation.seg_scales)
            probabilities = logits.float().softmax(dim=1)
            predictions["seg"] = probabilities.argmax(dim=1)
            refined = dense_crf(
                uint8_images,
                probabilities,
                gaussian=evaluation.crf_gaussian,
                bilateral=evaluation.crf_bilateral,
                iterations=evaluation.crf_iterations,
            )
            predictions["seg_crf"] = refined.argmax(dim=1)
            if single_scale:
                with autocast_for(config, device):
                    single = model.multi_scale_segment(images, (1.0,))
                predictions["seg_single_scale"] = single.argmax(dim=1)
            if "cam" not in metrics:
                cam_heat = probabilities[:, 1:].amax(1)
        for name, prediction in predictions.items():
            metrics[name].update(prediction, masks)
        room = evaluation.overlay_count - len(overlay_rows["images"])
        if overlay_path is not None and room > 0:
            pseudo = predictions.get("cam", predictions.get("seg"))
            final = predictions.get("seg_crf", pseudo)
            overlay_rows["images"].extend(uint8_images.permute(0, 2, 3, 1).cpu().numpy()[:room])
            overlay_rows["cams"].extend(cam_heat.cpu().numpy()[:room])
            overlay_rows["pseudo"].extend(pseudo.cpu().numpy()[:room])
            overlay_rows["pred"].extend(final.cpu().numpy()[:room])
            overlay_rows["gt"].extend(masks.cpu().numpy()[:room])
    model.train(was_training)
    results = {}
    for name, metric in metrics.items():
        scores = metric.compute()
        results[f"{name}_miou"] = 100 * scores.mean_iou
        results[f"{name}_per_class_iou"] = [round(100 * value, 2) for value in scores.per_class_iou]
    if overlay_path is not None and overlay_rows["images"]:
        save_overlay_grid(
            overlay_path,
            overlay_rows["images"],
            overlay_rows["cams"],
            overlay_rows["pseudo"],
            overlay_rows["pred"],
            overlay_rows["gt"],
        )
    return results


def autocast_for(config: TrainConfig, device: torch.device):
    """bf16 autocast on CUDA when ``amp``; a no-op elsewhere."""
    enabled = config.amp and device.type == "cuda"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


# The run --------------------------------------------------------------------------------


@dataclass
class Distributed:
    """This process's place in a torchrun job (world_size 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU) or a torch device name; ValueError when
    CUDA is asked for and missing."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but CUDA is not available")
    return device


def setup_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """Joins the torchrun process group when there is one; picks the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world_size, local_rank), device


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")


def _checkpoint_state(model, optimizer, scheduler, iteration, config, best, class_names) -> dict:
    return {
        "iteration": iteration,
        "num_classes": model.num_classes,
        "class_names": list(class_names),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "config": to_dict(config),
        "best_seg_miou": best,
    }


def _check_finite(terms: dict[str, torch.Tensor], total: torch.Tensor, iteration: int) -> None:
    """Raises NonFiniteLossError naming the first non-finite term (one device sync)."""
    values = torch.stack(
        [total.detach().float(), *(term.detach().float() for term in terms.values())]
    )
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return
    names = ["total", *terms]
    bad = [
        f"{names[index]}={values[index].item()}" for index in range(len(names)) if not finite[index]
    ]
    raise NonFiniteLossError(
        f"non-finite loss at iteration {iteration}: {', '.join(bad)}; the step was not taken "
        "and the last checkpoint is kept (lower the learning rate or check the data)"
    )


def method_stages(config: TrainConfig) -> list[TrainingStage] | None:
    """The steps of a method trained in several steps (its ``BUILDERS`` entry's
    ``stages(config)``), None for a single-stage method."""
    declare = getattr(BUILDERS.get(config.method), "stages", None)
    return None if declare is None else declare(config)


def train(
    config: TrainConfig, run_dir: Path, resume_from: Path | None = None, stage: str = "all"
) -> dict:
    """Trains ``config`` into ``run_dir``; returns the final metrics.

    A single-stage method is one run (``resume_from``: its checkpoint). A multi-step
    method runs its stages in order, each into ``run_dir/<stage>``; a stage already
    finished is skipped, an interrupted one resumed from its latest checkpoint, so the
    same call continues an interrupted run (``resume_from`` is unused). ``stage`` names
    the one stage to run, or ``all``.
    """
    stages = method_stages(config)
    if stages is None:
        if stage != "all":
            raise ValueError(f"{config.method} has a single stage; --stage must be 'all'")
        final, _ = _train_run(config, run_dir, resume_from)
        return final
    return _train_stages(config, stages, run_dir, stage)


def _train_stages(
    config: TrainConfig, stages: list[TrainingStage], run_dir: Path, only: str
) -> dict:
    """Runs ``stages`` (see ``train``); writes the merged ``final_metrics.json`` once
    every stage has finished."""
    names = [stage.name for stage in stages]
    if only != "all" and only not in names:
        raise ValueError(f"--stage must be 'all' or one of {names}, got {only!r}")
    distributed, device = setup_distributed(config.device)
    show = distributed.is_main
    if show:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", save_yaml(config))
    results: dict[str, dict] = {}
    pseudo_mask_seconds = 0.0
    for position, stage in enumerate(stages):
        stage_dir = run_dir / stage.name
        finished = stage_dir / "final_metrics.json"
        model = None
        if only in ("all", stage.name) and not finished.is_file():
            checkpoint = stage_dir / "checkpoints" / "latest.pt"
            mask_dir = None if stage.reads_masks is None else run_dir / stage.reads_masks
            results[stage.name], model = _train_run(
                stage.config,
                stage_dir,
                checkpoint if checkpoint.is_file() else None,
                mask_dir,
            )
        elif finished.is_file():
            results[stage.name] = json.loads(finished.read_text())
        later_selected = only == "all" or only in names[position:]
        if stage.writes_masks and stage.name in results and later_selected:
            started = time.perf_counter()
            write_pseudo_masks(
                stage, stage_dir, run_dir / stage.writes_masks, model, device, distributed
            )
            pseudo_mask_seconds += time.perf_counter() - started
    if len(results) < len(stages):
        return {"stages": results}
    final = _merge_stage_results(results, pseudo_mask_seconds)
    if show:
        atomic_write_text(run_dir / "final_metrics.json", json.dumps(final, indent=2) + "\n")
        print(_summary_table(final, run_dir))
    return final


def _merge_stage_results(results: dict[str, dict], pseudo_mask_seconds: float) -> dict:
    """One final record from the stages': each metric from the stage that gives it."""
    final: dict = {}
    per_class: dict = {}
    for result in results.values():
        for key in _SCORE_LABELS:
            if key in result:
                final[key] = result[key]
        per_class.update(result["per_class_iou"])
    any_result = next(iter(results.values()))
    final.update(
        {
            "iterations": {name: result["iterations"] for name, result in results.items()},
            "train_seconds": sum(result["train_seconds"] for result in results.values()),
            "pseudo_mask_seconds": pseudo_mask_seconds,
            "per_class_iou": per_class,
            "class_names": any_result["class_names"],
            "device": any_result["device"],
            "world_size": any_result["world_size"],
        }
    )
    return final


@torch.no_grad()
def write_pseudo_masks(
    stage: TrainingStage,
    stage_dir: Path,
    out_dir: Path,
    model: WSSSMethod | None,
    device: torch.device,
    distributed: Distributed,
) -> int:
    """Writes ``model.pseudo_masks`` of every train-split image without one yet as
    ``out_dir/<name>.png`` (atomically: a crash leaves no broken file; a rerun skips
    what exists). Images of equal size are batched (``eval.batch_size``); each process
    writes its share. ``model`` None: the stage's final checkpoint is loaded if any
    mask is missing. Returns the number written by this process."""
    config = stage.config
    out_dir.mkdir(parents=True, exist_ok=True)
    split = open_split(config, config.data.train_split, None)
    missing = [i for i, name in enumerate(split.names) if not (out_dir / f"{name}.png").is_file()]
    share = missing[distributed.rank :: distributed.world_size]
    if share:
        if model is None:
            model = _load_trained(config, stage_dir, split.num_foreground_classes, device)
        split.transform = EvalTransform(model.normalization)
        _write_masks(model, config, split, share, out_dir, device, distributed.is_main)
    if dist.is_initialized():
        dist.barrier()
    return len(share)


def _load_trained(config: TrainConfig, stage_dir: Path, num_classes: int, device) -> WSSSMethod:
    """The network of a finished stage, from its latest checkpoint."""
    checkpoint = load_checkpoint(stage_dir, map_location="cpu")
    model = build_method(replace(config, model=replace(config.model, pretrained=None)), num_classes)
    model.load_state_dict(checkpoint["model"])
    return model.to(device)


def _write_masks(model, config, split, indices, out_dir: Path, device, show: bool) -> None:
    was_training = model.training
    model.eval()
    loader = DataLoader(
        torch.utils.data.Subset(split, indices),
        batch_size=None,
        num_workers=config.data.num_workers,
    )
    progress = tqdm(total=len(indices), desc="pseudo-masks", unit="image", disable=not show)
    pending: list[dict] = []

    def flush() -> None:
        images = torch.stack([sample["image"] for sample in pending]).to(device)
        labels = torch.stack([sample["label"] for sample in pending]).to(device)
        with autocast_for(config, device):
            masks = model.pseudo_masks(images, labels)
        for sample, mask in zip(pending, masks.to(torch.uint8).cpu().numpy(), strict=True):
            path = out_dir / f"{sample['name']}.png"
            temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
            save_label_png(temporary, mask)
            os.replace(temporary, path)
        progress.update(len(pending))
        pending.clear()

    for sample in loader:
        if pending and (
            len(pending) == config.eval.batch_size
            or sample["image"].shape != pending[0]["image"].shape
        ):
            flush()
        pending.append(sample)
    if pending:
        flush()
    progress.close()
    model.train(was_training)


def _train_run(
    config: TrainConfig,
    run_dir: Path,
    resume_from: Path | None = None,
    mask_dir: Path | None = None,
) -> tuple[dict, WSSSMethod]:
    """Trains ``config`` into ``run_dir`` (training masks from ``mask_dir`` when given);
    returns the final metrics and the trained network."""
    distributed, device = setup_distributed(config.device)
    show = distributed.is_main
    torch.manual_seed(config.seed)

    checkpoint = load_checkpoint(resume_from, map_location="cpu") if resume_from else None
    start_iteration = checkpoint["iteration"] if checkpoint else 0
    best_seg_miou = checkpoint["best_seg_miou"] if checkpoint else -math.inf

    train_split = open_split(config, config.data.train_split, _keep_arrays)
    val_split = open_split(config, config.data.val_split, None)
    if not val_split.has_masks:
        raise ValueError(f"the val split {config.data.val_split!r} has no masks to score against")
    num_classes = train_split.num_foreground_classes

    model = build_method(config, num_classes).to(device)
    train_split_transform = TrainTransform(
        config.augmentation, model.normalization, model.backbone.patch_size
    )
    val_split.transform = EvalTransform(model.normalization)
    optimizer, scheduler = build_optimizer(config, model)
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
    network = model
    if distributed.world_size > 1:
        network = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    if mask_dir is not None:
        missing = [name for name in train_split.names if not (mask_dir / f"{name}.png").is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} training mask(s) missing in {mask_dir} (e.g. {missing[0]}.png): "
                "run the stage that writes them first"
            )
    samples = AugmentedSamples(train_split, train_split_transform, config.seed, mask_dir)
    sampler = IterationSampler(
        len(samples),
        config.batch_size,
        distributed.world_size,
        distributed.rank,
        config.seed,
        start_iteration,
        config.iters,
    )
    loader = DataLoader(
        samples,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.data.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        # Its own generator: creating the iterator draws no number from the global RNG.
        generator=torch.Generator().manual_seed(config.seed),
    )
    val_indices = list(range(len(val_split)))
    if config.eval.max_images is not None:
        val_indices = val_indices[: config.eval.max_images]
    val_loader = DataLoader(
        torch.utils.data.Subset(val_split, val_indices[distributed.rank :: distributed.world_size]),
        batch_size=config.eval.batch_size,
        num_workers=config.data.num_workers,
    )

    checkpoints = run_dir / "checkpoints"
    metrics_path = run_dir / "metrics.jsonl"
    if show:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", save_yaml(config))

    def save(name: str, iteration: int) -> None:
        if show:
            state = _checkpoint_state(
                model,
                optimizer,
                scheduler,
                iteration,
                config,
                best_seg_miou,
                train_split.class_names,
            )
            atomic_torch_save(state, checkpoints / name)

    def run_evaluation(iteration: int) -> dict:
        overlay = run_dir / "overlays" / f"iter_{iteration:07d}.png" if show else None
        results = evaluate(model, val_loader, config, device, overlay, show)
        if show:
            _append_jsonl(metrics_path, {"event": "eval", "iteration": iteration, **results})
        return results

    started = time.perf_counter()
    progress = tqdm(
        total=config.iters,
        initial=start_iteration,
        desc=f"train {config.method}",
        disable=not show,
        dynamic_ncols=True,
    )
    running: dict[str, float] = {}
    running_count = 0
    last_log = time.perf_counter()
    results: dict = {}
    iteration = start_iteration
    model.train()
    for batch in loader:
        # Every random draw of this step (crop centres, drop-path) from (seed, rank, iteration).
        torch.manual_seed(_mix_seed(config.seed, distributed.rank, iteration))
        batch = _to_device(batch, device)
        with autocast_for(config, device):
            step = network(batch, iteration)
        _check_finite(step.terms, step.total, iteration)
        optimizer.zero_grad(set_to_none=True)
        step.total.backward()
        optimizer.step()
        scheduler.step()
        model.after_step()
        iteration += 1

        for name, value in step.terms.items():
            running[name] = running.get(name, 0.0) + float(value.detach())
        running["total"] = running.get("total", 0.0) + float(step.total.detach())
        running_count += 1
        progress.update(1)
        if iteration % config.log_interval == 0 or iteration == config.iters:
            now = time.perf_counter()
            averages = {name: total / running_count for name, total in running.items()}
            progress.set_postfix(loss=f"{averages['total']:.3f}", refresh=False)
            if show:
                _append_jsonl(
                    metrics_path,
                    {
                        "event": "train",
                        "iteration": iteration,
                        "lr": scheduler.get_last_lr()[0],
                        "seconds_per_iteration": (now - last_log) / running_count,
                        **{f"loss_{name}": value for name, value in averages.items()},
                    },
                )
            running, running_count, last_log = {}, 0, now
        if iteration % config.eval.interval == 0 or iteration == config.iters:
            results = run_evaluation(iteration)
            # The best checkpoint by segmentation, or by CAMs for a network without one.
            score = results.get("seg_miou", results.get("cam_miou"))
            if score > best_seg_miou:
                best_seg_miou = score
                save("best.pt", iteration)
            if show:
                scores = ", ".join(
                    f"{label} {results[key]:.2f}"
                    for key, label in _SCORE_LABELS.items()
                    if key in results
                )
                progress.write(f"iteration {iteration}: {scores}")
        if iteration % config.checkpoint_interval == 0 or iteration == config.iters:
            save("latest.pt", iteration)
    progress.close()
    elapsed = time.perf_counter() - started
    if not results:  # resumed at the end: score the final weights
        results = run_evaluation(iteration)
    final = {
        **{key: results[key] for key in _SCORE_LABELS if key in results},
        "iterations": iteration,
        "train_seconds": elapsed,
        "per_class_iou": {
            key.removesuffix("_per_class_iou"): value
            for key, value in results.items()
            if key.endswith("_per_class_iou")
        },
        "class_names": list(train_split.class_names),
        "device": str(device),
        "world_size": distributed.world_size,
    }
    if show:
        atomic_write_text(run_dir / "final_metrics.json", json.dumps(final, indent=2) + "\n")
        print(_summary_table(final, run_dir))
    return final, model


_SCORE_LABELS = {
    "cam_miou": "cam mIoU",
    "seg_miou": "seg mIoU",
    "seg_crf_miou": "seg+CRF mIoU",
    "seg_single_scale_miou": "seg one-scale mIoU",
}
_TABLE_LABELS = {
    "cam_miou": "CAM mIoU (val, true labels)",
    "seg_miou": "segmentation mIoU (val)",
    "seg_crf_miou": "segmentation + CRF mIoU (val)",
    "seg_single_scale_miou": "segmentation mIoU, one scale (val)",
}


def _summary_table(final: dict, run_dir: Path) -> str:
    rows = [(label, f"{final[key]:.2f}") for key, label in _TABLE_LABELS.items() if key in final]
    rows += [
        ("iterations", _iterations_text(final["iterations"])),
        ("training time", f"{final['train_seconds'] / 60:.1f} min"),
        ("run directory", str(run_dir)),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    rule = "-" * max(len(line) for line in lines)
    return "\n".join([rule, *lines, rule])


def _iterations_text(iterations: int | dict) -> str:
    """``720``, or per stage ``cam 400, seg 300``."""
    if isinstance(iterations, dict):
        return ", ".join(f"{name} {count}" for name, count in iterations.items())
    return str(iterations)


# Command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m wsss_fast.train",
        description="Train a WSSS method. With no arguments: ToCo on the built-in synthetic "
        "dataset. Extra key=value arguments override any config field (e.g. "
        "optim.lr=1e-4 toco.ptc_weight=0.3).",
    )
    parser.add_argument("--method", choices=METHODS, default=None, help="default: toco")
    parser.add_argument(
        "--data",
        default=None,
        help=f"one of {', '.join(DATASETS)}, or a path to a folder in VOC layout "
        "(default: synthetic)",
    )
    parser.add_argument("--data-root", default=None, help="dataset root for voc and coco")
    parser.add_argument("--backbone", default=None, help="any timm ViT name")
    parser.add_argument(
        "--pretrained",
        default=None,
        help="local weights file, or timm weights name (arch.tag) of the backbone",
    )
    parser.add_argument("--config", type=Path, default=None, help="YAML config file")
    parser.add_argument("--iters", type=int, default=None, help="training iterations")
    parser.add_argument("--batch-size", type=int, default=None, help="per process")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--out", type=Path, default=None, help="run directory")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        help="continue the run in --out (or the run directory / checkpoint given here)",
    )
    parser.add_argument(
        "--stage",
        default="all",
        help="for a method trained in steps (weaktr: cam, seg): run only this step "
        "(default: all, in order; finished steps are skipped)",
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser


def resolve_config(arguments: argparse.Namespace) -> TrainConfig:
    """Defaults <- YAML file <- flags <- key=value overrides (see ``wsss_fast.config``)."""
    method = arguments.method or "toco"
    flags: dict = {"method": method}
    data: dict = {}
    if arguments.data is not None:
        if arguments.data in DATASETS:
            data["dataset"] = arguments.data
        else:
            data["dataset"], data["root"] = "folder", arguments.data
    if arguments.data_root is not None:
        data["root"] = arguments.data_root
    dataset = data.get("dataset", "synthetic")
    layers = []
    config_file = arguments.config or default_config_file(method, dataset)
    if config_file is not None:
        layers.append(load_yaml(config_file))
    model: dict = {}
    if arguments.backbone is not None:
        model["backbone"] = arguments.backbone
        model["pretrained"] = None  # a config file's weights belong to its backbone
    if arguments.pretrained is not None:
        model["pretrained"] = arguments.pretrained
    for key, value in (("iters", arguments.iters), ("batch_size", arguments.batch_size)):
        if value is not None:
            flags[key] = value
    if arguments.device is not None:
        flags["device"] = arguments.device
    if data:
        flags["data"] = data
    if model:
        flags["model"] = model
    layers.append(flags)
    layers.extend(parse_override(text) for text in arguments.overrides)
    return build_config(layers)


def _resumed_config(arguments: argparse.Namespace) -> tuple[TrainConfig, Path, Path | None]:
    """(config, run directory, checkpoint) of the run ``--resume`` continues; the
    checkpoint is None for a multi-step run (each step finds its own)."""
    fixed = {
        "--method": arguments.method,
        "--data": arguments.data,
        "--data-root": arguments.data_root,
        "--backbone": arguments.backbone,
        "--pretrained": arguments.pretrained,
        "--config": arguments.config,
        "--batch-size": arguments.batch_size,
    }
    changed = [flag for flag, value in fixed.items() if value is not None]
    if changed or arguments.overrides:
        raise ValueError(
            "a resumed run keeps its config; only --iters and --device may change, got "
            + ", ".join(changed + arguments.overrides)
        )
    source = Path(arguments.resume) if arguments.resume else arguments.out
    if source is None:
        raise ValueError("--resume needs a run directory: give --out DIR or --resume DIR")
    checkpoint_path = source / "checkpoints" / "latest.pt" if source.is_dir() else source
    staged = source.is_dir() and not checkpoint_path.is_file() and _is_staged_run(source)
    if not staged and not checkpoint_path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume at {checkpoint_path}")
    run_dir = arguments.out or (source if source.is_dir() else source.parent.parent)
    if staged:
        layers = [load_yaml(source / "config.yaml")]
        checkpoint_path = None
    else:
        layers = [load_checkpoint(checkpoint_path)["config"]]
    if arguments.iters is not None:
        layers.append({"iters": arguments.iters})
    if arguments.device is not None:
        layers.append({"device": arguments.device})
    return build_config(layers), run_dir, checkpoint_path


def _is_staged_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run of a method trained in steps."""
    config_path = run_dir / "config.yaml"
    return (
        config_path.is_file() and method_stages(build_config([load_yaml(config_path)])) is not None
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    resume_from = None
    # Errors in the arguments and config are usage errors; errors in the run keep
    # their traceback.
    try:
        if arguments.resume is not None:
            config, run_dir, resume_from = _resumed_config(arguments)
        else:
            config = resolve_config(arguments)
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            run_dir = (
                arguments.out or Path("runs") / f"{config.method}_{config.data.dataset}_{stamp}"
            )
            if (run_dir / "checkpoints" / "latest.pt").exists() or _is_staged_run(run_dir):
                raise ValueError(f"{run_dir} already holds a run: pass --resume, or another --out")
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    try:
        train(config, run_dir, resume_from, arguments.stage)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
