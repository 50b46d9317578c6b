"""Pixel-adaptive refinement (PAR) in plain PyTorch, structured as ToCo's reference code.

ToCo (``model/PAR.py``, taken over from AFA, called image by image from
``utils/camutils.py: refine_cams_with_bkg_v2``) gathers the 8 neighbours of every
pixel at each dilation with a replicate pad and a dilated 3x3 "shift" convolution,
concatenates them into a (1, C, K, H, W) tensor, builds the affinities from it, then
gathers and weights the neighbours of the probability maps the same way at every
iteration. This module does the same, image by image. Ground truth for tests and the
benchmark baseline.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# ToCo's std guard.
STD_EPS = 1e-8


def shift_kernel(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(8, 1, 3, 3) one-hot kernels picking the 8 neighbours of the centre, row by row:
    (-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)."""
    weight = torch.zeros(8, 1, 3, 3, dtype=dtype, device=device)
    for index, flat in enumerate((0, 1, 2, 3, 5, 6, 7, 8)):
        weight[index, 0, flat // 3, flat % 3] = 1
    return weight


def dilated_neighbors(x: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """(b, c, H, W) -> (b, c, K, H, W), K = 8 * len(dilations), replicate padding."""
    b, c, h, w = x.shape
    kernel = shift_kernel(x.dtype, x.device)
    neighbors = []
    for d in dilations:
        padded = F.pad(x, [d] * 4, mode="replicate")
        padded = padded.reshape(b * c, 1, padded.shape[-2], padded.shape[-1])
        neighbors.append(F.conv2d(padded, kernel, dilation=d).view(b, c, -1, h, w))
    return torch.cat(neighbors, dim=2)


def neighbor_distances(
    dilations: Sequence[int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """(1, 1, K, 1, 1) distances: dilation * sqrt(2) for the diagonals, dilation otherwise."""
    unit = torch.ones(8, dtype=dtype, device=device)
    unit[[0, 2, 5, 7]] = 2**0.5
    return torch.cat([unit * d for d in dilations]).view(1, 1, -1, 1, 1)


def pixel_affinity(
    image: torch.Tensor, dilations: Sequence[int], w_color: float, w_pos: float
) -> torch.Tensor:
    """(1, 3, H, W) image -> (1, 1, K, H, W) affinities softmax(a) + w_pos * softmax(p)."""
    _, _, h, w = image.shape
    neighbors = dilated_neighbors(image, dilations)
    centre = image.unsqueeze(2).repeat(1, 1, neighbors.shape[2], 1, 1)
    distances = neighbor_distances(dilations, image.dtype, image.device).repeat(1, 1, 1, h, w)

    color_diff = torch.abs(neighbors - centre)
    color_std = torch.std(neighbors, dim=2, keepdim=True)
    pos_std = torch.std(distances, dim=2, keepdim=True)

    color_aff = -((color_diff / (color_std + STD_EPS) / w_color) ** 2)
    color_aff = color_aff.mean(dim=1, keepdim=True)
    # As ToCo: the position term is also scaled by the colour weight.
    pos_aff = -((distances / (pos_std + STD_EPS) / w_color) ** 2)
    return F.softmax(color_aff, dim=2) + w_pos * F.softmax(pos_aff, dim=2)


def refine_pixel_adaptive(
    images: torch.Tensor,
    probs: torch.Tensor,
    *,
    dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
    iterations: int = 10,
    w_color: float = 0.3,
    w_pos: float = 0.01,
) -> torch.Tensor:
    """PAR of ``probs`` guided by ``images``, one image at a time.

    Args:
        images: (B, 3, H, W) float images in [0, 1].
        probs: (B, M, H, W) float maps at the images' resolution (ToCo interpolates them
            to it first).

    Returns:
        (B, M, H, W) in the probs' dtype, computed in float32 (float64 inputs in float64).
    """
    dtype = torch.promote_types(torch.promote_types(images.dtype, probs.dtype), torch.float32)
    refined = []
    for index in range(images.shape[0]):
        image = images[index : index + 1].to(dtype)
        masks = probs[index : index + 1].to(dtype)
        affinity = pixel_affinity(image, dilations, w_color, w_pos)
        for _ in range(iterations):
            masks = (dilated_neighbors(masks, dilations) * affinity).sum(2)
        refined.append(masks)
    return torch.cat(refined).to(probs.dtype)
