"""WeakTr's step-1 training step structured as the reference code: the benchmark's
baseline.

Same network and losses as ``wsss_fast.methods.weaktr.WeakTrCAM.training_step``,
computed the way WeakTr's ``models.py`` (``WeakTr.forward``) and ``AAF.py`` do:

- every block's post-softmax attention map is kept (explicit attention, no SDPA, when
  the caller switches it off with ``model.backbone.set_fused_attention(False)``),
  stacked to (L, B, H, T, T), detached and cloned, then permuted to (B, L*H, T, T);
- the attention-branch outputs are stacked, detached and cloned the same way, and the
  AAF pools them with an adaptive pooling over a (B, L*H*d, T, 1) view;
- the fused map is ``maps * weights.expand_as(maps)`` averaged over the L*H maps
  (as ``wsss_fast.reference.attention_fusion``), the fine CAM a batched matmul of the
  patch-to-patch block with the CAMs as column vectors; everything in fp32.

(The reference splits a head's features as interleaved channels; ours, and so this
baseline, as contiguous chunks: see the method's docstring.)
"""

import torch
import torch.nn.functional as F
from torch import nn

from wsss_fast.methods.base import StepOutput
from wsss_fast.methods.weaktr import WeakTrCAM


def encode_with_attention_maps(model: WeakTrCAM, images: torch.Tensor):
    """The backbone pass, with every block's softmax attention map (B, H, T, T) caught
    where the explicit attention applies its dropout to it."""
    maps: list[torch.Tensor] = []
    handles = [
        block.attn.attn_drop.register_forward_hook(lambda _m, inputs, _o: maps.append(inputs[0]))
        for block in model.backbone.vit.blocks
    ]
    try:
        output = model.backbone(images)
    finally:
        for handle in handles:
            handle.remove()
    if len(maps) != model.backbone.num_blocks:
        raise RuntimeError("attention maps are only seen with set_fused_attention(False)")
    return output, maps


def adaptive_attention_weights(model: WeakTrCAM, attention_features: torch.Tensor):
    """``AAF.forward_weight``: (B, G, T, d) features -> (B, G) weights."""
    fusion = model.attention_fusion
    batch, maps, tokens, width = attention_features.shape
    columns = (
        attention_features.permute(0, 1, 3, 2).contiguous().view(batch, maps * width, tokens, 1)
    )
    pool = nn.AdaptiveMaxPool2d(1) if fusion.pooling == "max" else nn.AdaptiveAvgPool2d(1)
    pooled = pool(columns).view(batch * maps, width)
    scores = fusion.head_score(pooled).view(batch, maps)
    return fusion.excitation(scores)


def reference_training_step(model: WeakTrCAM, batch: dict) -> StepOutput:
    """WeakTr's step-1 losses on ``batch``, structured as the reference code."""
    images, image_labels = batch["image"], batch["label"]
    num_classes = model.num_classes
    output, attention_maps = encode_with_attention_maps(model, images)
    height, width = output.grid

    coarse = model.cam_head(output.patch_map())

    stacked_maps = torch.stack(attention_maps).detach().clone()  # (L, B, H, T, T)
    layers, batch_size, heads, tokens, _ = stacked_maps.shape
    stacked_maps = (
        stacked_maps.permute(1, 0, 2, 3, 4)
        .contiguous()
        .view(batch_size, layers * heads, tokens, tokens)
    )
    stacked_features = torch.stack(output.attention_outputs).detach().clone()  # (L, B, T, D)
    stacked_features = stacked_features.view(layers, batch_size, tokens, heads, -1)
    stacked_features = stacked_features.permute(1, 0, 3, 2, 4).contiguous()
    stacked_features = stacked_features.view(batch_size, layers * heads, tokens, -1)
    weights = adaptive_attention_weights(model, stacked_features)
    fused = (stacked_maps * weights.view(batch_size, -1, 1, 1).expand_as(stacked_maps)).mean(1)

    coarse_cam = F.relu(coarse.detach().clone())
    cross_attention = fused[:, :num_classes, num_classes:].reshape(
        batch_size, num_classes, height, width
    )
    cams = cross_attention * coarse_cam
    patch_attention = fused[:, num_classes:, num_classes:]
    fine_cam = torch.matmul(
        patch_attention.unsqueeze(1), cams.view(batch_size, num_classes, -1, 1)
    ).reshape(batch_size, num_classes, height, width)
    maps = {
        "class_logits": output.class_tokens.mean(-1),
        "coarse_cam": coarse,
        "fine_cam": fine_cam,
    }
    # The losses pool the CAMs by their mean (the reference's AdaptiveAvgPool2d(1)).
    return model.combine_losses(maps, image_labels)
