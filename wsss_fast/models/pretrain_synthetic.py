"""Pretrains a conv-stem ViT on synthetic shapes of classes the target dataset lacks.

Real WSSS runs start from ImageNet weights; the built-in synthetic dataset has no such
thing, and a ViT trained from scratch on its 8 classes learns too slowly on a CPU
(methods.md). This script makes the stand-in: it trains the backbone on the "pretrain"
class set of ``wsss_fast.data.synthetic`` (12 shapes, none of the target 8, images drawn
with another seed), so the target classes and images are never seen. It writes the
backbone alone (no head), fp16, with a metadata dict:

    python -m wsss_fast.models.pretrain_synthetic \\
        --out wsss_fast/models/weights/vit_convstem_tiny_patch8.synthshapes.pt

Two tasks: ``classify`` (image-level multi-label, average pooling: ImageNet-like) and
``segment`` (per-token classification of the other shapes' masks, background
included), the default. Why dense masks: image-level classification of shapes at this
difficulty learns slowly on a CPU (a from-scratch hybrid ViT reached 19.7 % exact label
sets after 10 minutes), so a classification-pretrained backbone of ~15 CPU-minutes would
be about as weak; the masks give a per-pixel signal and teach objectness. The shipped
weights are this script's defaults (4000 steps, 56 min on one thread of a 2-core
machine, val mIoU 45.1 over the 13 classes of the pretraining set). A shorter run
(1200 steps, val mIoU 18.8) already lifted the target's average-pooled CAM mIoU after
4 minutes of fine-tuning from 11.1 (scratch) to 36.3 (bench/RESULTS.md).

Training is on batches augmented in tensor form: a random resized crop,
horizontal flip and colour jitter; a class counts as present in a crop when it keeps
``min_label_pixels`` pixels.
"""

import argparse
import dataclasses
import datetime
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import wsss_fast.models  # noqa: F401  (registers the timm models)
from wsss_fast.data import SegmentationFolder, SyntheticConfig, get_or_create_synthetic_dataset
from wsss_fast.metrics import SegmentationMetric
from wsss_fast.models.conv_stem import SYNTHSHAPES_WEIGHTS

TASKS = ("classify", "segment")


@dataclass(frozen=True)
class PretrainRecipe:
    """Every setting of a pretraining run; stored in the weights file's metadata."""

    model: str = "vit_convstem_tiny_patch8"
    task: str = "segment"
    class_set: str = "pretrain"
    data_seed: int = 1  # not the target dataset's seed 0: other images as well as classes
    num_train: int = 20000
    num_val: int = 500
    steps: int = 4000
    batch_size: int = 48
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    crop_scale: tuple[float, float] = (0.5, 1.0)  # area fraction of the random crop
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = 0.3  # jitter factors are drawn from [1 - x, 1 + x]
    contrast: float = 0.3
    saturation: float = 0.4
    min_label_pixels: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.class_set == SyntheticConfig().class_set:
            raise ValueError("pretraining on the target class set would leak its classes")


def load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A whole split in memory: images (N, 3, H, W) uint8, masks (N, H, W) uint8,
    labels (N, C) float32 multi-hot."""
    dataset = SegmentationFolder(root, split)
    samples = [dataset[index] for index in range(len(dataset))]
    images = torch.stack([sample["image"] for sample in samples])
    masks = torch.stack([torch.as_tensor(sample["mask"], dtype=torch.uint8) for sample in samples])
    labels = torch.stack([sample["label"] for sample in samples])
    return images, masks, labels


def augment(
    images: torch.Tensor, masks: torch.Tensor, num_classes: int, recipe: PretrainRecipe
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random resized crop + flip + colour jitter of a batch, labels from the cropped masks.

    images (B, 3, H, W) float in [0, 1], masks (B, H, W) int64 with values in
    [0, num_classes] -> images, masks of the same shapes, labels (B, num_classes) float.
    """
    batch, _, height, width = images.shape
    scale = torch.empty(batch).uniform_(*recipe.crop_scale)
    aspect = torch.empty(batch).uniform_(*(math.log(a) for a in recipe.crop_aspect)).exp()
    crop_width = (scale * aspect).sqrt().clamp(max=1.0)  # fractions of the side
    crop_height = (scale / aspect).sqrt().clamp(max=1.0)
    flip = torch.where(torch.rand(batch) < 0.5, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = crop_width * flip
    theta[:, 0, 2] = (torch.rand(batch) * 2 - 1) * (1 - crop_width)
    theta[:, 1, 1] = crop_height
    theta[:, 1, 2] = (torch.rand(batch) * 2 - 1) * (1 - crop_height)
    grid = F.affine_grid(theta, [batch, 3, height, width], align_corners=False)
    images = F.grid_sample(
        images, grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    masks = F.grid_sample(
        masks[:, None].float(), grid, mode="nearest", padding_mode="border", align_corners=False
    )[:, 0].long()
    pixels = F.one_hot(masks, num_classes + 1).sum((1, 2))[:, 1:]
    labels = (pixels >= recipe.min_label_pixels).float()

    def factor(amount: float) -> torch.Tensor:
        return torch.empty(batch, 1, 1, 1).uniform_(1 - amount, 1 + amount)

    # Channel order too: colour must never say the class.
    order = torch.stack([torch.randperm(3) for _ in range(batch)])
    images = torch.gather(images, 1, order[:, :, None, None].expand_as(images))
    images = images * factor(recipe.brightness)
    mean = images.mean((1, 2, 3), keepdim=True)
    images = (images - mean) * factor(recipe.contrast) + mean
    gray = images.mean(1, keepdim=True)
    images = (images - gray) * factor(recipe.saturation) + gray
    return images.clamp(0, 1), masks, labels


class TokenHead(nn.Module):
    """Backbone + bias-free 1x1 conv on the final patch tokens.

    (B, 3, H, W) -> scores (B, K, H/p, W/p); ``classify`` pools them by their mean.
    """

    def __init__(self, backbone: nn.Module, num_outputs: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Conv2d(backbone.embed_dim, num_outputs, 1, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(images)[:, self.backbone.num_prefix_tokens :]
        grid = self.backbone.patch_embed.dynamic_feat_size(images.shape[-2:])
        token_map = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)
        return self.head(token_map)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]: the (0.5, 0.5, 0.5) mean and std of the models' pretrained_cfg."""
    return images * 2 - 1


def task_loss(
    model: TokenHead, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, task: str
) -> torch.Tensor:
    """Multi-label soft margin on mean-pooled scores, or pixel cross-entropy on upsampled ones."""
    scores = model(normalize(images))
    if task == "classify":
        return F.multilabel_soft_margin_loss(scores.mean((2, 3)), labels)
    upsampled = F.interpolate(scores, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(upsampled, masks)


@torch.no_grad()
def evaluate(model: TokenHead, split: tuple, task: str, batch_size: int = 100) -> dict:
    """Validation scores: exact label-set accuracy and per-label accuracy (classify) or
    pixel mIoU over background + classes (segment)."""
    images, masks, labels = split
    model.eval()
    num_classes = labels.shape[1]
    metric = SegmentationMetric(num_classes + 1)
    predicted = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].float() / 255
        scores = model(normalize(batch))
        if task == "classify":
            predicted.append(scores.mean((2, 3)) > 0)
        else:
            upsampled = F.interpolate(
                scores, size=batch.shape[-2:], mode="bilinear", align_corners=False
            )
            metric.update(upsampled.argmax(1), masks[start : start + batch_size].long())
    model.train()
    if task == "classify":
        correct = torch.cat(predicted) == labels.bool()
        return {
            "exact": correct.all(1).float().mean().item(),
            "per_label": correct.float().mean().item(),
        }
    return {"miou": metric.compute().mean_iou}


def save_backbone(backbone: nn.Module, out: Path, metadata: dict) -> None:
    """Writes {"state_dict": fp16 floats, "metadata": ...} to ``out`` atomically."""
    state_dict = {
        name: value.half() if value.is_floating_point() else value
        for name, value in backbone.state_dict().items()
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        torch.save({"state_dict": state_dict, "metadata": metadata}, partial)
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def pretrain(recipe: PretrainRecipe, out: Path, eval_every: int, progress: bool = True) -> dict:
    """Runs the recipe, writes the backbone to ``out`` and returns its metadata."""
    torch.manual_seed(recipe.seed)
    data = SyntheticConfig(
        seed=recipe.data_seed,
        num_train=recipe.num_train,
        num_val=recipe.num_val,
        class_set=recipe.class_set,
    )
    root = get_or_create_synthetic_dataset(data, progress=progress)
    train_images, train_masks, _ = load_split(root, "train")
    val = load_split(root, "val")
    class_names = data.shape_names
    backbone = timm.create_model(recipe.model, num_classes=0)
    outputs = len(class_names) + (recipe.task == "segment")
    model = TokenHead(backbone, outputs)
    optimizer = torch.optim.AdamW(model.parameters(), recipe.lr, weight_decay=recipe.weight_decay)

    def learning_rate_factor(step: int) -> float:
        warmup = min(1.0, (step + 1) / recipe.warmup_steps)
        return warmup * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    started = time.perf_counter()
    scores: dict = {}
    bar = tqdm(range(1, recipe.steps + 1), desc=f"pretrain {recipe.task}", disable=not progress)
    for step in bar:
        index = torch.randint(len(train_images), (recipe.batch_size,))
        images, masks, labels = augment(
            train_images[index].float() / 255,
            train_masks[index].long(),
            len(class_names),
            recipe,
        )
        loss = task_loss(model, images, masks, labels, recipe.task)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % eval_every == 0 or step == recipe.steps:
            scores = evaluate(model, val, recipe.task)
            shown = " ".join(f"{key} {value:.3f}" for key, value in scores.items())
            tqdm.write(f"step {step} val {shown} ({time.perf_counter() - started:.0f} s)")
    metadata = {
        "model": recipe.model,
        "classes": list(class_names),
        "recipe": dataclasses.asdict(recipe),
        "val_scores": scores,
        "train_seconds": round(time.perf_counter() - started, 1),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": str(torch.__version__),
    }
    save_backbone(backbone, out, metadata)
    return metadata


def main(argv: list[str] | None = None) -> int:
    defaults = PretrainRecipe()
    parser = argparse.ArgumentParser(
        prog="python -m wsss_fast.models.pretrain_synthetic",
        description="Pretrain a conv-stem ViT on synthetic shapes of non-target classes.",
    )
    parser.add_argument("--out", type=Path, default=SYNTHSHAPES_WEIGHTS, help="weights file")
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--task", choices=TASKS, default=defaults.task)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--num-train", type=int, default=defaults.num_train)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--eval-every", type=int, default=500, help="steps between val scores")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    arguments = parser.parse_args(argv)
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    try:
        recipe = PretrainRecipe(
            model=arguments.model,
            task=arguments.task,
            steps=arguments.steps,
            batch_size=arguments.batch_size,
            lr=arguments.lr,
            num_train=arguments.num_train,
            seed=arguments.seed,
        )
    except ValueError as error:
        parser.error(str(error))
    metadata = pretrain(recipe, arguments.out, arguments.eval_every)
    print(f"wrote {arguments.out} after {metadata['train_seconds']} s: {metadata['val_scores']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
