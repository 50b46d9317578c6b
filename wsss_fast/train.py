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

Multi-GPU and multi-node: ``torchrun --nproc_per_node N -m wsss_fast.train ...`` (NCCL on
GPUs, gloo on CPUs); ``batch_size`` is per process.
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
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
)
from wsss_fast.data.cache import atomic_write_text
from wsss_fast.methods import WSSSMethod, build_method
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
    what was loaded before), which makes resumed runs exact. Masks are dropped: the
    methods train from image-level labels only."""

    def __init__(self, dataset: SegmentationFolder, transform: TrainTransform, seed: int):
        self.dataset = dataset
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> dict:
        raw = self.dataset[key % len(self.dataset)]
        image, _mask = raw["arrays"]
        generator = torch.Generator().manual_seed(_mix_seed(self.seed, 0x5A17, key))
        sample = self.transform(image, None, generator)
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


@torch.no_grad()
def evaluate(
    model: WSSSMethod,
    loader: DataLoader,
    config: TrainConfig,
    device: torch.device,
    overlay_path: Path | None,
    show_progress: bool,
) -> dict:
    """CAM, segmentation and segmentation + CRF mIoU (percent) on the val split.

    CAMs are masked by the true image labels (the protocol for CAM quality); the
    segmentation never sees labels. Writes the overlay grid of the first
    ``eval.overlay_count`` images to ``overlay_path`` when given.
    """
    num_classes = model.num_classes + 1
    metrics = {
        name: SegmentationMetric(num_classes, device=device) for name in ("cam", "seg", "seg_crf")
    }
    overlay_rows: dict[str, list] = {key: [] for key in ("images", "cams", "pseudo", "pred", "gt")}
    was_training = model.training
    model.eval()
    evaluation = config.eval
    for batch in tqdm(loader, desc="evaluate", leave=False, disable=not show_progress):
        images = batch["image"].to(device)
        masks = batch["mask"].to(device)
        labels = batch["label"].to(device)
        with autocast_for(config, device):
            cams = model.multi_scale_cams(images, evaluation.cam_scales)
            logits = model.multi_scale_segment(images, evaluation.seg_scales)
        cam_prediction = cams_to_prediction(cams.float(), labels, evaluation.cam_background)
        probabilities = logits.float().softmax(dim=1)
        seg_prediction = probabilities.argmax(dim=1)
        # The CRF's uint8 images, made on the device (no round trip through the host).
        uint8_images = (model.normalization.denormalize(images.float()) * 255.0).round()
        uint8_images = uint8_images.to(torch.uint8)
        refined = dense_crf(
            uint8_images,
            probabilities,
            gaussian=evaluation.crf_gaussian,
            bilateral=evaluation.crf_bilateral,
            iterations=evaluation.crf_iterations,
        )
        crf_prediction = refined.argmax(dim=1)
        metrics["cam"].update(cam_prediction, masks)
        metrics["seg"].update(seg_prediction, masks)
        metrics["seg_crf"].update(crf_prediction, masks)
        room = evaluation.overlay_count - len(overlay_rows["images"])
        if overlay_path is not None and room > 0:
            overlay_rows["images"].extend(uint8_images.permute(0, 2, 3, 1).cpu().numpy()[:room])
            overlay_rows["cams"].extend(
                (cams * labels[:, :, None, None]).amax(1).cpu().numpy()[:room]
            )
            overlay_rows["pseudo"].extend(cam_prediction.cpu().numpy()[:room])
            overlay_rows["pred"].extend(crf_prediction.cpu().numpy()[:room])
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


def train(config: TrainConfig, run_dir: Path, resume_from: Path | None = None) -> dict:
    """Trains ``config`` into ``run_dir``; returns the final metrics."""
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

    samples = AugmentedSamples(train_split, train_split_transform, config.seed)
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
            if results["seg_miou"] > best_seg_miou:
                best_seg_miou = results["seg_miou"]
                save("best.pt", iteration)
            if show:
                progress.write(
                    f"iteration {iteration}: cam mIoU {results['cam_miou']:.2f}, seg mIoU "
                    f"{results['seg_miou']:.2f}, seg+CRF mIoU {results['seg_crf_miou']:.2f}"
                )
        if iteration % config.checkpoint_interval == 0 or iteration == config.iters:
            save("latest.pt", iteration)
    progress.close()
    elapsed = time.perf_counter() - started
    if not results:  # resumed at the end: score the final weights
        results = run_evaluation(iteration)
    final = {
        "cam_miou": results["cam_miou"],
        "seg_miou": results["seg_miou"],
        "seg_crf_miou": results["seg_crf_miou"],
        "iterations": iteration,
        "train_seconds": elapsed,
        "per_class_iou": {
            "cam": results["cam_per_class_iou"],
            "seg": results["seg_per_class_iou"],
            "seg_crf": results["seg_crf_per_class_iou"],
        },
        "class_names": list(train_split.class_names),
        "device": str(device),
        "world_size": distributed.world_size,
    }
    if show:
        atomic_write_text(run_dir / "final_metrics.json", json.dumps(final, indent=2) + "\n")
        print(_summary_table(final, run_dir))
    return final


def _summary_table(final: dict, run_dir: Path) -> str:
    rows = [
        ("CAM mIoU (val, true labels)", f"{final['cam_miou']:.2f}"),
        ("segmentation mIoU (val)", f"{final['seg_miou']:.2f}"),
        ("segmentation + CRF mIoU (val)", f"{final['seg_crf_miou']:.2f}"),
        ("iterations", str(final["iterations"])),
        ("training time", f"{final['train_seconds'] / 60:.1f} min"),
        ("run directory", str(run_dir)),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    rule = "-" * max(len(line) for line in lines)
    return "\n".join([rule, *lines, rule])


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


def _resumed_config(arguments: argparse.Namespace) -> tuple[TrainConfig, Path, Path]:
    """(config, run directory, checkpoint) of the run ``--resume`` continues."""
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
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume at {checkpoint_path}")
    run_dir = arguments.out or (source if source.is_dir() else source.parent.parent)
    layers = [load_checkpoint(checkpoint_path)["config"]]
    if arguments.iters is not None:
        layers.append({"iters": arguments.iters})
    if arguments.device is not None:
        layers.append({"device": arguments.device})
    return build_config(layers), run_dir, checkpoint_path


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
            if (run_dir / "checkpoints" / "latest.pt").exists():
                raise ValueError(f"{run_dir} already holds a run: pass --resume, or another --out")
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    try:
        train(config, run_dir, resume_from)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
