"""Token-similarity contrast loss in plain PyTorch, structured as ToCo's reference code.

ToCo (``model/losses.py: get_masked_ptc_loss`` and ``utils/camutils.py:
label_to_aff_mask``) builds the full (B, N, N) cosine similarity and a (B, N, N) int64
relation tensor with a Python loop over the images, then masks and sums. This module
does the same, extended with the two options APC's patch contrast needs (the signed
cosine, a margin on the negatives). Ground truth for tests and the benchmark baseline.
"""

import torch
import torch.nn.functional as F

# ToCo's F.normalize eps.
NORMALIZE_EPS = 1e-8
# Marks ignored pairs in the relation tensor. ToCo marks them with ignore_index itself,
# which would collide with the 0 / 1 relations for ignore_index in {0, 1}.
IGNORED_PAIR = -1


def label_to_relation(labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """(B, N) token labels -> (B, N, N) int64 relation, as ToCo's label_to_aff_mask.

    1 where both labels are equal, 0 where they differ, ``IGNORED_PAIR`` where either
    token is ignored and on the diagonal.
    """
    batch, num_tokens = labels.shape
    labels_rep = labels.reshape(batch, 1, num_tokens).repeat([1, num_tokens, 1])
    labels_rep_t = labels_rep.permute(0, 2, 1)
    relation = (labels_rep == labels_rep_t).long()
    for i in range(batch):
        ignored = labels_rep[i, 0, :] == ignore_index
        relation[i, :, ignored] = IGNORED_PAIR
        relation[i, ignored, :] = IGNORED_PAIR
    relation[:, range(num_tokens), range(num_tokens)] = IGNORED_PAIR
    return relation


def cosine_similarity(tokens: torch.Tensor, absolute: bool = True) -> torch.Tensor:
    """(B, N, D) tokens -> (B, N, N) cosine similarity (its absolute value if ``absolute``)."""
    x = F.normalize(tokens, p=2, dim=-1, eps=NORMALIZE_EPS)
    cos_sim = torch.matmul(x, x.transpose(1, 2))
    return torch.abs(cos_sim) if absolute else cos_sim


def token_contrast_loss(
    tokens: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = 255,
    absolute: bool = True,
    margin: float = 0.0,
) -> torch.Tensor:
    """0.5 * (1 - sum_pos s / (n_pos + 1)) + 0.5 * sum_neg max(s - margin, 0) / (n_neg + 1).

    Args:
        tokens: (B, N, D) float tokens (computed in their dtype, as the reference does).
        labels: (B, N) integer token labels; ``ignore_index`` marks ignored tokens.

    Returns:
        0-d tensor in the tokens' dtype.
    """
    similarity = cosine_similarity(tokens, absolute)
    relation = label_to_relation(labels, ignore_index)
    pos_mask = relation == 1
    neg_mask = relation == 0
    neg_term = torch.relu(similarity - margin)
    loss = 0.5 * (1 - torch.sum(pos_mask * similarity) / (pos_mask.sum() + 1))
    return loss + 0.5 * torch.sum(neg_mask * neg_term) / (neg_mask.sum() + 1)
