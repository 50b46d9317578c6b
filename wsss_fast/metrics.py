"""Segmentation scores from a confusion matrix accumulated on the device.

mIoU as WSSS papers report it: over all K classes, background included, pixels whose
ground truth is the ignore label (255) left out; IoU_k = TP / (TP + FP + FN), and a class
absent from both ground truth and prediction is left out of the mean (its IoU is NaN).
Under DDP the matrices of all processes are summed with ``all_reduce``.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist

from wsss_fast.data.palette import IGNORE_INDEX


def confusion_matrix(
    prediction: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Counts (target, prediction) pairs with one bincount on the tensors' device.

    Args:
        prediction: integer class indices, any shape, values in [0, num_classes).
        target: the same shape; values in [0, num_classes) or ``ignore_index``.

    Returns (num_classes, num_classes) int64: rows are ground truth, columns predictions.
    Raises ValueError when a value lies outside the class range (255 in a prediction
    included: score label maps before marking pixels as ignored).
    """
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction shape {tuple(prediction.shape)} differs from target shape "
            f"{tuple(target.shape)}"
        )
    if prediction.is_floating_point() or target.is_floating_point():
        raise ValueError("prediction and target must hold integer class indices")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    prediction = prediction.reshape(-1).long()
    target = target.reshape(-1).long()
    counted = target != ignore_index
    out_of_range = counted & (
        (target < 0) | (target >= num_classes) | (prediction < 0) | (prediction >= num_classes)
    )
    # Bin K*K collects ignored pixels, bin K*K+1 out-of-range ones: one bincount, no
    # boolean indexing, so a single device synchronisation (bincount's own).
    pair_index = target * num_classes + prediction
    pair_index = torch.where(counted, pair_index, num_classes * num_classes)
    pair_index = torch.where(out_of_range, num_classes * num_classes + 1, pair_index)
    counts = torch.bincount(pair_index, minlength=num_classes * num_classes + 2)
    if counts[-1].item():
        bad_target = counted & ((target < 0) | (target >= num_classes))
        if bad_target.any().item():
            which, values = "target", target[bad_target]
        else:
            which, values = "prediction", prediction[out_of_range]
        shown = values.unique()[:10].tolist()
        raise ValueError(
            f"{which} holds class indices {shown} outside [0, {num_classes}) "
            f"(ignore index {ignore_index})"
        )
    return counts[: num_classes * num_classes].reshape(num_classes, num_classes)


@dataclass(frozen=True)
class SegmentationScores:
    """Scores of a confusion matrix; IoUs are fractions in [0, 1] (NaN: class absent)."""

    per_class_iou: list[float]
    mean_iou: float
    pixel_accuracy: float
    confusion: torch.Tensor  # (K, K) int64 on the CPU, rows ground truth

    @classmethod
    def from_confusion(cls, confusion: torch.Tensor) -> "SegmentationScores":
        confusion = confusion.detach().to("cpu", torch.int64)
        true_positive = confusion.diagonal().double()
        union = confusion.sum(0).double() + confusion.sum(1).double() - true_positive
        iou = torch.where(union > 0, true_positive / union.clamp(min=1), float("nan"))
        present = ~iou.isnan()
        mean_iou = iou[present].mean().item() if present.any() else float("nan")
        total = confusion.sum().item()
        pixel_accuracy = true_positive.sum().item() / total if total else float("nan")
        return cls(iou.tolist(), mean_iou, pixel_accuracy, confusion)


class SegmentationMetric:
    """Accumulates a confusion matrix over batches, on the device the data lives on.

    ``update`` as often as needed, then ``compute``; under DDP every process must call
    ``compute`` (it all-reduces a copy of the matrix, so calling it twice is safe).
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = IGNORE_INDEX,
        device: torch.device | str | None = None,
    ):
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.confusion.zero_()

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Adds a batch: ``prediction`` and ``target`` integer maps of one shape."""
        if prediction.device != self.confusion.device:
            self.confusion = self.confusion.to(prediction.device)
        self.confusion += confusion_matrix(
            prediction, target.to(prediction.device), self.num_classes, self.ignore_index
        )

    def compute(self) -> SegmentationScores:
        """Scores of all updates so far, summed over processes when distributed."""
        confusion = self.confusion.clone()
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend() == "nccl" and not confusion.is_cuda:
                confusion = confusion.cuda()  # NCCL reduces CUDA tensors only
            dist.all_reduce(confusion, op=dist.ReduceOp.SUM)
        return SegmentationScores.from_confusion(confusion)
