"""Scores a folder of PNG label maps against ground truth.

    python -m wsss_fast.evaluate --pred DIR --gt DIR --num-classes K [--json FILE]
        [--names SPLIT_FILE] [--class-names FILE] [--ignore-index 255]

Predictions and ground truths are PNGs of class indices (palette or single-channel),
matched by file name. Without ``--names`` both folders must hold the same names; with
it, exactly the listed names are scored (so ``--gt`` can be VOC's SegmentationClass,
which holds train and val masks). Prints the IoU of every class and ``mIoU: xx.xx``
(percent); ``--json`` also writes the scores (percent, NaN as null) to a file.
"""

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from wsss_fast.data.cache import atomic_write_text
from wsss_fast.data.folder import read_class_names, read_split_file
from wsss_fast.data.palette import IGNORE_INDEX, read_label_png
from wsss_fast.metrics import SegmentationMetric, SegmentationScores

_MAX_LISTED_NAMES = 10


def _png_names(folder: Path, flag: str) -> set[str]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {folder} does not exist or is no folder")
    return {path.stem for path in folder.glob("*.png")}


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(sorted(names)[:_MAX_LISTED_NAMES])
    more = len(names) - _MAX_LISTED_NAMES
    return shown + (f", ... ({more} more)" if more > 0 else "")


def matched_names(pred_dir: Path, gt_dir: Path, names: Sequence[str] | None = None) -> list[str]:
    """The names to score; ValueError naming the files that do not pair up."""
    predictions = _png_names(pred_dir, "--pred")
    ground_truths = _png_names(gt_dir, "--gt")
    wanted = set(names) if names is not None else predictions | ground_truths
    missing_predictions = sorted(wanted - predictions)
    missing_ground_truths = sorted(wanted - ground_truths)
    problems = []
    if missing_ground_truths:
        problems.append(
            f"{len(missing_ground_truths)} name(s) have no ground truth in {gt_dir}: "
            + _listed([f"{name}.png" for name in missing_ground_truths])
        )
    if missing_predictions:
        problems.append(
            f"{len(missing_predictions)} name(s) have no prediction in {pred_dir}: "
            + _listed([f"{name}.png" for name in missing_predictions])
        )
    if problems:
        raise ValueError(
            "prediction and ground-truth folders do not match:\n  " + "\n  ".join(problems)
        )
    if not wanted:
        raise ValueError(f"no PNG files to score in --pred {pred_dir} or --gt {gt_dir}")
    return sorted(wanted)


def evaluate_folders(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    num_classes: int,
    *,
    names: Sequence[str] | None = None,
    ignore_index: int = IGNORE_INDEX,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> tuple[SegmentationScores, int]:
    """Scores every prediction PNG against its ground truth.

    Returns the scores and the number of images. Raises ValueError naming the files
    when the folders do not match, when a pair differs in size, or when a label lies
    outside [0, num_classes) (ground truth: or ``ignore_index``).
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    scored_names = matched_names(pred_dir, gt_dir, names)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    metric = SegmentationMetric(num_classes, ignore_index, device=device)
    for name in tqdm(scored_names, desc="scoring", unit="image", disable=not progress):
        pred_path, gt_path = pred_dir / f"{name}.png", gt_dir / f"{name}.png"
        prediction = read_label_png(pred_path)
        ground_truth = read_label_png(gt_path)
        if prediction.shape != ground_truth.shape:
            raise ValueError(
                f"{pred_path} is {prediction.shape[1]}x{prediction.shape[0]} but {gt_path} "
                f"is {ground_truth.shape[1]}x{ground_truth.shape[0]}"
            )
        try:
            metric.update(
                torch.from_numpy(prediction).to(device), torch.from_numpy(ground_truth).to(device)
            )
        except ValueError as error:
            raise ValueError(f"{pred_path} / {gt_path}: {error}") from error
    return metric.compute(), len(scored_names)


def _percent(value: float) -> float | None:
    return None if math.isnan(value) else round(100.0 * value, 4)


def format_scores(scores: SegmentationScores, class_names: Sequence[str] | None = None) -> str:
    """The per-class IoU table and the ``mIoU: xx.xx`` line, in percent."""
    width = max([len(name) for name in class_names or []] + [5])
    lines = [f"{'class':>{width + 5}}    IoU"]
    for index, iou in enumerate(scores.per_class_iou):
        name = class_names[index] if class_names else ""
        shown = "    -" if math.isnan(iou) else f"{100 * iou:6.2f}"
        lines.append(f"{index:4d} {name:<{width}} {shown}")
    lines.append(f"pixel accuracy: {100 * scores.pixel_accuracy:.2f}")
    lines.append(f"mIoU: {100 * scores.mean_iou:.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m wsss_fast.evaluate",
        description="Score PNG label maps against ground truth (mIoU over all classes, "
        "background included; ignore-index pixels of the ground truth left out).",
    )
    parser.add_argument("--pred", required=True, type=Path, help="folder of predicted PNGs")
    parser.add_argument("--gt", required=True, type=Path, help="folder of ground-truth PNGs")
    parser.add_argument(
        "--num-classes", required=True, type=int, help="classes including background (VOC: 21)"
    )
    parser.add_argument("--json", type=Path, help="also write the scores (percent) here")
    parser.add_argument("--names", type=Path, help="split file: score exactly these names")
    parser.add_argument("--class-names", type=Path, help="class-names file, background first")
    parser.add_argument("--ignore-index", type=int, default=IGNORE_INDEX)
    arguments = parser.parse_args(argv)
    if arguments.num_classes < 1:
        parser.error(f"--num-classes must be positive, got {arguments.num_classes}")
    try:
        class_names = None
        if arguments.class_names is not None:
            class_names = read_class_names(arguments.class_names)
            if len(class_names) != arguments.num_classes:
                raise ValueError(
                    f"--class-names {arguments.class_names} names {len(class_names)} classes "
                    f"but --num-classes is {arguments.num_classes}"
                )
        names = None if arguments.names is None else read_split_file(arguments.names)
        scores, num_images = evaluate_folders(
            arguments.pred,
            arguments.gt,
            arguments.num_classes,
            names=names,
            ignore_index=arguments.ignore_index,
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_scores(scores, class_names))
    if arguments.json is not None:
        labels = class_names or [str(index) for index in range(arguments.num_classes)]
        report = {
            "miou": _percent(scores.mean_iou),
            "pixel_accuracy": _percent(scores.pixel_accuracy),
            "per_class_iou": {
                label: _percent(iou)
                for label, iou in zip(labels, scores.per_class_iou, strict=True)
            },
            "num_images": num_images,
            "num_classes": arguments.num_classes,
            "pred": str(arguments.pred),
            "gt": str(arguments.gt),
        }
        atomic_write_text(arguments.json, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
