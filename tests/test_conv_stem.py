"""The conv-stem ViT: timm registration, token grids at several input sizes, shipped weights."""

import pytest
import timm
import torch

from wsss_fast.data.synthetic import SHAPE_CLASS_NAMES
from wsss_fast.models import SYNTHSHAPES_WEIGHTS, ConvStemPatchEmbed

MODEL = "vit_convstem_tiny_patch8"


def test_builds_through_timm_with_the_half_mean_and_std():
    model = timm.create_model(MODEL, num_classes=0)
    assert isinstance(model.patch_embed, ConvStemPatchEmbed)
    assert model.patch_embed.patch_size == (8, 8) and model.num_prefix_tokens == 1
    config = timm.data.resolve_model_data_config(model)
    assert config["mean"] == (0.5, 0.5, 0.5) and config["std"] == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("size", [32, 64, 96])
def test_patch_embedding_accepts_any_size_divisible_by_its_stride(size):
    model = timm.create_model(MODEL, num_classes=0).eval()
    with torch.no_grad():
        tokens = model.patch_embed(torch.randn(2, 3, size, size))
    assert tokens.shape == (2, (size // 8) ** 2, 192)
    assert model.patch_embed.dynamic_feat_size((size, size)) == (size // 8, size // 8)


def test_dynamic_img_size_runs_the_whole_vit_at_another_size():
    model = timm.create_model(MODEL, num_classes=0, dynamic_img_size=True).eval()
    with torch.no_grad():
        tokens = model.forward_features(torch.randn(1, 3, 96, 96))
    assert tokens.shape == (1, 1 + 144, 192)  # the class token, then the patches


def test_stem_options_and_patch_size_must_agree():
    model = timm.create_model(
        MODEL, num_classes=0, patch_size=4, stem_channels=(16, 32), stem_norm="group"
    )
    assert model.patch_embed(torch.randn(1, 3, 64, 64)).shape == (1, 256, 192)
    with pytest.raises(ValueError, match="2 \\*\\* len"):
        timm.create_model(MODEL, patch_size=16)


@pytest.mark.skipif(not SYNTHSHAPES_WEIGHTS.is_file(), reason="weights not produced")
def test_shipped_weights_load_strictly():
    checkpoint = torch.load(SYNTHSHAPES_WEIGHTS, map_location="cpu", weights_only=True)
    assert checkpoint["metadata"]["model"] == MODEL
    # Pretrained without the target classes.
    assert not set(checkpoint["metadata"]["classes"]) & set(SHAPE_CLASS_NAMES)
    model = timm.create_model(MODEL, num_classes=0)
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    pretrained = timm.create_model(f"{MODEL}.synthshapes", pretrained=True, num_classes=0)
    for name, value in pretrained.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[name])
