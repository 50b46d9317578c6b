"""The timm ViT wrapper: tokens, resized position embedding, q/k capture, local weights."""

import pytest
import timm
import torch

from wsss_fast.models.backbone import ViTBackbone
from wsss_fast.ops import fuse_attention_maps

NAME = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return ViTBackbone(NAME, img_size=64).eval()


def test_tokens_match_timm(backbone):
    images = torch.randn(2, 3, 64, 48)
    output = backbone(images, intermediate_blocks=(-3, 2))
    final, intermediates = backbone.vit.forward_intermediates(
        images, indices=[2, 9], norm=False, output_fmt="NLC"
    )
    assert output.grid == (4, 3)
    assert output.patch_tokens.shape == (2, 12, 192)
    torch.testing.assert_close(output.patch_tokens, final[:, 1:])
    torch.testing.assert_close(output.class_token, final[:, 0])
    assert sorted(output.intermediate) == [2, 9]
    torch.testing.assert_close(output.intermediate[9], intermediates[1])
    assert output.patch_map().shape == (2, 192, 4, 3)
    assert output.queries == [] and output.keys == []


def test_any_multiple_of_the_patch_size_works(backbone):
    for size in ((32, 32), (96, 80), (16, 128)):
        output = backbone(torch.randn(1, 3, *size))
        assert output.grid == (size[0] // 16, size[1] // 16)
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        backbone(torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match="out of range"):
        backbone.block_index(12)


def test_query_key_capture_is_what_attention_uses(backbone):
    images = torch.randn(2, 3, 48, 64)
    inputs = []
    handle = backbone.vit.blocks[3].attn.register_forward_hook(
        lambda module, args, output: inputs.append(args[0])
    )
    try:
        output = backbone(images, capture_query_key=True)
    finally:
        handle.remove()
    assert len(output.queries) == len(output.keys) == 12
    attention = backbone.vit.blocks[3].attn
    qkv = attention.qkv(inputs[0]).reshape(2, 13, 3, 3, 64).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(output.queries[3], qkv[0])
    torch.testing.assert_close(output.keys[3], qkv[1])
    # The captured q and k feed the attention-fusion op directly.
    queries = torch.stack(output.queries, dim=1).flatten(1, 2)  # (B, L*H, T, d)
    keys = torch.stack(output.keys, dim=1).flatten(1, 2)
    weights = torch.ones(2, queries.shape[1])  # the mean of the maps: rows sum to 1
    fused = fuse_attention_maps(queries, keys, weights, backend="reference")
    assert fused.shape == (2, 13, 13)
    torch.testing.assert_close(fused.sum(-1), torch.ones(2, 13))


def test_explicit_attention_gives_the_same_tokens(backbone):
    images = torch.randn(1, 3, 64, 64)
    fast = backbone(images).patch_tokens
    backbone.set_fused_attention(False)
    try:
        explicit = backbone(images).patch_tokens
    finally:
        backbone.set_fused_attention(True)
    torch.testing.assert_close(fast, explicit, rtol=1e-4, atol=1e-5)


def test_local_pretrained_weights_load_through_timm(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model(NAME, num_classes=0)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    loaded = ViTBackbone(NAME, pretrained=str(path), img_size=224)
    for name, value in source.state_dict().items():
        torch.testing.assert_close(loaded.vit.state_dict()[name], value, msg=name)
    # At another crop size timm resamples the position embedding.
    resized = ViTBackbone(NAME, pretrained=str(path), img_size=64)
    assert resized.vit.pos_embed.shape == (1, 1 + 16, 192)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ViTBackbone(NAME, pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="neither a file nor timm weights"):
        ViTBackbone(NAME, pretrained="deit_small_patch16_224.fb_in1k")
