"""Training augmentations (box and flip consistency), normalisation, multi-scale inference."""

import numpy as np
import pytest
import timm
import torch

from wsss_fast.data import (
    EvalTransform,
    Normalization,
    TrainAugmentationConfig,
    TrainTransform,
    multi_scale_flip_inference,
    pixel_box_to_token_box,
)

HALF = Normalization(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
NO_JITTER = {"color_jitter_probability": 0.0, "grayscale_probability": 0.0}


def _left_right_image(height=20, width=30):
    """Left third red with label 1, the rest blue with label 2; the label is in the colour."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    mask = np.full((height, width), 2, dtype=np.uint8)
    image[:, : width // 3, 0] = 255
    image[:, width // 3 :, 2] = 255
    mask[:, : width // 3] = 1
    return image, mask


def _transform(patch_size=8, **overrides):
    config = TrainAugmentationConfig(**{"crop_size": 32, **NO_JITTER, **overrides})
    return TrainTransform(config, HALF, patch_size)


def _inside(box):
    top, bottom, left, right = box.tolist()
    return slice(top, bottom), slice(left, right)


def test_normalization_comes_from_the_backbones_pretrained_config():
    assert Normalization.from_timm("vit_base_patch16_224.augreg2_in21k_ft_in1k") == HALF
    deit = Normalization.from_timm("deit_small_patch16_224")
    assert deit.mean == pytest.approx((0.485, 0.456, 0.406))
    with pytest.raises(ValueError, match="no pretrained config"):
        Normalization.from_timm("no_such_model")


def test_normalization_finds_the_timm_model_inside_a_wrapper():
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = timm.create_model(
                "deit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, num_classes=0
            )

    assert Normalization.from_timm(Wrapper()).std == pytest.approx((0.229, 0.224, 0.225))
    with pytest.raises(ValueError, match="Conv2d holds no timm model"):
        Normalization.from_timm(torch.nn.Conv2d(3, 3, 1))


def test_normalize_and_denormalize_are_inverse():
    images = torch.rand(2, 3, 5, 4)
    normalized = HALF.normalize(images)
    assert torch.allclose(normalized, images * 2 - 1)
    assert torch.allclose(HALF.denormalize(normalized), images, atol=1e-6)
    uint8 = HALF.to_uint8_images(normalized)
    assert uint8.shape == (2, 5, 4, 3) and uint8.dtype == np.uint8


def test_padding_lies_exactly_outside_the_valid_box():
    image, mask = _left_right_image()
    transform = _transform(rescale_range=(0.6, 2.5))
    generator = torch.Generator().manual_seed(0)
    for _ in range(25):
        sample = transform(image, mask, generator)
        assert sample["image"].shape == (3, 32, 32) and sample["mask"].shape == (32, 32)
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[_inside(sample["valid_box"])] = True
        assert torch.equal(sample["mask"] != 255, inside)
        # Padding is the mean colour: 0 after normalisation.
        assert (sample["image"][:, ~inside] == 0).all()


def test_image_and_mask_stay_aligned_through_rescale_flip_and_crop():
    image, mask = _left_right_image()
    transform = _transform(rescale_range=(0.6, 2.5), flip_probability=0.5)
    generator = torch.Generator().manual_seed(1)
    for _ in range(25):
        sample = transform(image, mask, generator)
        rows, columns = _inside(sample["valid_box"])
        red = HALF.denormalize(sample["image"])[0, rows, columns] > 0.5
        label_one = sample["mask"][rows, columns] == 1
        # Bilinear resizing blends colours along the edge; elsewhere they agree.
        assert (red == label_one).float().mean() > 0.9


def test_a_flip_moves_image_mask_and_box_together():
    image, mask = _left_right_image()  # smaller than the crop: the box holds all of it
    unscaled = {"rescale_range": (1.0, 1.0)}
    kept = _transform(flip_probability=0.0, **unscaled)(
        image, mask, torch.Generator().manual_seed(2)
    )
    flipped = _transform(flip_probability=1.0, **unscaled)(
        image, mask, torch.Generator().manual_seed(2)
    )
    # Same draws after the flip: the same padding offsets, mirrored content.
    assert torch.equal(kept["valid_box"], flipped["valid_box"])
    rows, columns = _inside(kept["valid_box"])
    assert torch.equal(flipped["mask"][rows, columns], kept["mask"][rows, columns].flip(-1))
    assert torch.equal(flipped["image"][:, rows, columns], kept["image"][:, rows, columns].flip(-1))
    # The red (label 1) third is now on the right of the box.
    assert flipped["mask"][rows, columns][:, -1].eq(1).all()
    assert HALF.denormalize(flipped["image"])[0, rows, columns][:, -1].gt(0.9).all()


def test_global_views_share_the_flip_of_the_training_crop():
    image, mask = _left_right_image(height=24, width=24)
    transform = _transform(flip_probability=1.0, global_view_count=2, global_view_scale=(1, 1))
    sample = transform(image, mask, torch.Generator().manual_seed(3))
    views = HALF.denormalize(sample["global_views"])
    assert views.shape == (2, 3, 32, 32)
    # A full-image view (scale 1), flipped like the crop: red on the right, blue on the left.
    assert (views[:, 0, :, -4:] > 0.9).all() and (views[:, 2, :, :4] > 0.9).all()


def test_token_box_is_the_pixel_box_on_the_token_grid():
    assert pixel_box_to_token_box((16, 48, 0, 32), 16) == (1, 3, 0, 2)
    assert pixel_box_to_token_box((5, 40, 17, 63), 16) == (0, 3, 1, 4)
    image, mask = _left_right_image(height=17, width=21)
    transform = _transform(patch_size=8, rescale_range=(0.5, 1.5))
    generator = torch.Generator().manual_seed(4)
    for _ in range(20):
        sample = transform(image, mask, generator)
        top, bottom, left, right = sample["valid_box"].tolist()
        token_top, token_bottom, token_left, token_right = sample["token_box"].tolist()
        # Every token in the box overlaps the valid pixels; the box covers all of them.
        assert token_top * 8 <= top < (token_top + 1) * 8
        assert (token_bottom - 1) * 8 < bottom <= token_bottom * 8
        assert token_left * 8 <= left < (token_left + 1) * 8
        assert (token_right - 1) * 8 < right <= token_right * 8


def test_colour_jitter_changes_colours_but_not_geometry():
    image, mask = _left_right_image()
    plain = _transform()(image, mask, torch.Generator().manual_seed(5))
    jittered = TrainTransform(
        TrainAugmentationConfig(crop_size=32, color_jitter_probability=1.0, brightness=0.9),
        HALF,
        8,
    )(image, mask, torch.Generator().manual_seed(5))
    assert torch.equal(plain["valid_box"], jittered["valid_box"])
    assert torch.equal(plain["mask"], jittered["mask"])
    assert not torch.equal(plain["image"], jittered["image"])


def test_crop_size_must_be_a_multiple_of_the_patch_size():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        TrainTransform(TrainAugmentationConfig(crop_size=30), HALF, 16)
    with pytest.raises(ValueError, match="rescale_range"):
        TrainAugmentationConfig(rescale_range=(2.0, 1.0))


def test_eval_transform_keeps_the_whole_image():
    image, mask = _left_right_image()
    sample = EvalTransform(HALF)(image, mask)
    assert sample["image"].shape == (3, 20, 30) and sample["image"].dtype == torch.float32
    assert sample["image"].min() == -1 and sample["image"].max() == 1
    assert torch.equal(sample["mask"], torch.from_numpy(mask.astype(np.int64)))


def test_multi_scale_flip_inference_undoes_the_flip_and_sums_scales():
    images = torch.rand(2, 3, 16, 24)
    ramp = torch.linspace(0, 1, 24)  # breaks the mirror symmetry of the forward

    def forward(batch):
        return batch * torch.linspace(0, 1, batch.shape[-1])

    summed = multi_scale_flip_inference(forward, images, flip_merge="sum")
    assert torch.allclose(summed, images * (ramp + ramp.flip(0)), atol=1e-6)
    maxed = multi_scale_flip_inference(forward, images, flip_merge="max")
    assert torch.allclose(maxed, images * torch.maximum(ramp, ramp.flip(0)), atol=1e-6)

    seen_sizes = []

    def recording(batch):
        seen_sizes.append((batch.shape[0], *batch.shape[-2:]))
        return batch[:, :2, ::4, ::4]

    merged = multi_scale_flip_inference(
        recording, images, scales=(1.0, 0.5, 1.5), size_divisor=8, output_size=(10, 12)
    )
    assert merged.shape == (2, 2, 10, 12)
    assert seen_sizes == [(4, 16, 24), (4, 8, 16), (4, 24, 40)]
    single = multi_scale_flip_inference(lambda batch: batch, images, flip=False)
    assert torch.equal(single, images)
