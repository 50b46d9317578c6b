"""What the trainer, the evaluation and inference need of a method.

A method is an ``nn.Module`` whose ``forward(batch, iteration)`` is its training step
(so DDP's wrapper runs it) and returns a ``StepOutput``. The trainer owns everything
else: data, optimizer, schedule, checkpoints, evaluation.
"""

from dataclasses import dataclass

import torch
from torch import nn

from wsss_fast.config import TrainConfig
from wsss_fast.data.transforms import Normalization
from wsss_fast.models.backbone import ViTBackbone


@dataclass
class StepOutput:
    """A training step's result: the weighted total, each term (unweighted, with its
    weight in ``weights``) and the segmentation pseudo-labels made on the way
    ((B, H, W) int64, 255 ignored; None when the step makes none)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    weights: dict[str, float]
    seg_labels: torch.Tensor | None = None


class WSSSMethod(nn.Module):
    """Base of every method.

    Subclasses set ``num_classes`` (C, foreground classes), ``backbone`` (a
    ``ViTBackbone``) and ``normalization`` (how images are normalised), and implement
    ``training_step``, ``parameter_groups``, ``multi_scale_cams`` and
    ``multi_scale_segment``; ``after_step`` is their hook for EMA updates.
    """

    num_classes: int
    backbone: ViTBackbone
    normalization: Normalization

    def forward(self, batch: dict[str, torch.Tensor], iteration: int) -> StepOutput:
        """The training step; ``forward`` so that DDP's wrapper runs it."""
        return self.training_step(batch, iteration)

    def training_step(self, batch: dict[str, torch.Tensor], iteration: int) -> StepOutput:
        """The method's losses on one batch (``image`` (B, 3, S, S), ``label`` (B, C),
        ``valid_box`` (B, 4), and what the method's augmentation adds)."""
        raise NotImplementedError

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone parameters, head parameters): the optimizer gives heads
        ``optim.head_lr_multiplier`` times the backbone's learning rate."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after every optimizer step (EMA teachers update here)."""

    def multi_scale_cams(self, images: torch.Tensor, scales: tuple[float, ...]) -> torch.Tensor:
        """Normalised CAMs in [0, 1] at the images' size, (B, 3, H, W) -> (B, C, H, W)
        float32, not masked by labels."""
        raise NotImplementedError

    def multi_scale_segment(self, images: torch.Tensor, scales: tuple[float, ...]) -> torch.Tensor:
        """Segmentation logits at the images' size, (B, 3, H, W) -> (B, C + 1, H, W)
        float32 (background first)."""
        raise NotImplementedError


@dataclass(frozen=True)
class TrainingStage:
    """One step of a method trained in several steps (WeakTr: CAM network, then
    segmenter). The trainer runs each as a full run in ``<run>/<name>/`` with its own
    ``config``. ``writes_masks``: after training, the stage's network writes
    ``pseudo_masks(images, labels)`` of the whole train split into ``<run>/<folder>/``;
    ``reads_masks``: the stage trains on the masks of that folder (augmented with the
    images) instead of none. A method declares its stages through a ``stages(config)``
    attribute of its ``BUILDERS`` entry; methods without one are a single stage."""

    name: str
    config: TrainConfig
    writes_masks: str | None = None
    reads_masks: str | None = None
