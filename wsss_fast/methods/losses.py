"""Losses shared by the methods, written so that no input can make them NaN."""

import torch
import torch.nn.functional as F

from wsss_fast.data.palette import IGNORE_INDEX

_NEGATIVE_EPS = 1e-4  # ToCo's: the InfoNCE denominator stays positive without negatives


def segmentation_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Cross-entropy averaged separately over background and foreground pixels, halved
    and summed (ToCo's ``get_seg_loss``).

    A part without pixels contributes exactly 0, so a fully ignored crop gives a loss
    of 0 with an all-zero gradient, where ``F.cross_entropy(reduction="mean")`` gives
    NaN (the reference's most reported failure).

    Args:
        logits: (B, K, H, W) float.
        labels: (B, H, W) int64, 0 background, 1..K-1 classes, ``ignore_index`` ignored.

    Returns a 0-d float32 tensor.
    """
    valid = labels != ignore_index
    per_pixel = F.cross_entropy(
        logits.float(), labels.masked_fill(~valid, 0), reduction="none"
    ).masked_fill(~valid, 0.0)
    background = valid & (labels == 0)
    foreground = valid & (labels != 0)
    loss = logits.new_zeros((), dtype=torch.float32)
    for part in (background, foreground):
        count = part.sum()
        loss = loss + 0.5 * (per_pixel * part).sum() / count.clamp(min=1)
    return loss


def class_token_contrast_loss(
    teacher: torch.Tensor, student: torch.Tensor, positive: torch.Tensor, temperature: float
) -> torch.Tensor:
    """ToCo's class-token contrast (CTC), vectorised and in log space.

    For every image, teacher view t and positive student view j:
    -log(e^{z_tj} / (e^{z_tj} + sum_neg e^{z_tn} + 1e-4)) with z = teacher . student /
    temperature; summed over the positives and both teacher views, divided by
    2 * (number of positives), averaged over images. Computed as
    softplus(log S - z) with S from a log-sum-exp, so large logits cannot overflow. The
    reference's stray extra term (a for/else that always runs) is not there.

    Args:
        teacher: (B, T, E) teacher projections (no gradient expected).
        student: (B, V, E) student projections.
        positive: (B, V) bool, which student views are positives.

    Returns a 0-d float32 tensor.
    """
    logits = torch.einsum("bte,bve->btv", teacher.float(), student.float()) / temperature
    negative_logits = logits.masked_fill(positive[:, None, :], float("-inf"))
    epsilon = torch.full_like(logits[..., :1], _NEGATIVE_EPS).log()
    log_negatives = torch.logsumexp(torch.cat([negative_logits, epsilon], dim=-1), dim=-1)
    per_pair = F.softplus(log_negatives[..., None] - logits)  # (B, T, V)
    per_pair = per_pair * positive[:, None, :]
    positives = positive.sum(dim=1).clamp(min=1)
    per_image = per_pair.sum(dim=(1, 2)) / (teacher.shape[1] * positives)
    return per_image.mean()
