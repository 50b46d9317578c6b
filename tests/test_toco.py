"""ToCo: losses finite, gradients only where the spec says, the NaN-free pieces."""

import pytest
import torch

from wsss_fast.config import ModelConfig, ToCoConfig
from wsss_fast.methods import ToCo
from wsss_fast.methods.losses import class_token_contrast_loss, segmentation_loss
from wsss_fast.methods.toco import sample_local_crops
from wsss_fast.reference.toco_step import class_token_contrast_loops, reference_training_step

NUM_CLASSES = 5
CROP = 64


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = ToCoConfig(
        local_crop_size=32,
        local_crop_count=3,
        projection_hidden_dim=32,
        projection_bottleneck_dim=16,
        projection_out_dim=24,
        par_dilations=(1, 2),
        par_iterations=3,
    )
    return ToCo(ModelConfig(backbone="vit_tiny_patch16_224"), config, NUM_CLASSES, CROP)


def make_batch(seed, batch=3, boxes=None):
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.rand(batch, NUM_CLASSES, generator=generator) < 0.4).float()
    labels[:, 0] = 1.0  # every image has a class
    if boxes is None:
        boxes = torch.tensor([[0, CROP, 0, CROP]] * batch)
    return {
        "image": torch.randn(batch, 3, CROP, CROP, generator=generator),
        "label": labels,
        "valid_box": boxes,
        "global_views": torch.randn(batch, 1, 3, CROP, CROP, generator=generator),
    }


def gradient_owners(model, loss):
    """The top-level modules whose parameters get a non-zero gradient from ``loss``."""
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    owners = set()
    for name, parameter in model.named_parameters():
        if parameter.grad is not None and parameter.grad.abs().sum() > 0:
            owners.add(name.split(".")[0])
    return owners


def test_every_term_is_finite_and_weighted_by_the_schedule(model):
    step = model(make_batch(1), iteration=0)
    assert set(step.terms) == {"cls", "cls_aux", "ptc", "ctc", "seg"}
    for name, value in step.terms.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    assert step.weights["seg"] == 0.0  # before seg_start_iter
    later = model(make_batch(1), iteration=model.config.seg_start_iter)
    assert later.weights == {"cls": 1.0, "cls_aux": 1.0, "ptc": 0.2, "ctc": 0.5, "seg": 0.1}
    assert step.seg_labels.shape == (3, CROP, CROP)


def test_gradients_reach_only_what_the_spec_says(model):
    step = model(make_batch(2), iteration=5000)
    terms = step.terms
    assert gradient_owners(model, terms["cls"]) == {"backbone", "classifier"}
    assert gradient_owners(model, terms["cls_aux"]) == {"backbone", "aux_classifier"}
    # PTC trains the encoder only; its labels come from the (detached) aux CAM.
    assert gradient_owners(model, terms["ptc"]) == {"backbone"}
    # CTC: the student head and the encoder; the EMA teacher never gets a gradient.
    assert gradient_owners(model, terms["ctc"]) == {"backbone", "student_head"}
    # Segmentation: its head and the encoder, not the classifiers its labels came from.
    assert gradient_owners(model, terms["seg"]) == {"backbone", "seg_head"}
    assert all(not p.requires_grad for p in model.teacher_head.parameters())


def test_a_fully_ignored_batch_gives_finite_losses(model):
    empty = torch.zeros(3, 4, dtype=torch.int64)  # no image pixel in any crop
    step = model(make_batch(3, boxes=empty), iteration=5000)
    assert (step.seg_labels == 255).all()
    assert step.terms["seg"].item() == 0.0
    for name, value in step.terms.items():
        assert torch.isfinite(value), name
    model.zero_grad(set_to_none=True)
    step.total.backward()
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert torch.isfinite(parameter.grad).all(), name


def test_segmentation_loss_is_zero_without_labels_and_balanced_otherwise():
    logits = torch.randn(2, 4, 5, 6, requires_grad=True)
    ignored = torch.full((2, 5, 6), 255)
    loss = segmentation_loss(logits, ignored)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))

    labels = torch.randint(0, 4, (2, 5, 6))
    labels[0, 0] = 255
    per_pixel = torch.nn.functional.cross_entropy(
        logits, labels, ignore_index=255, reduction="none"
    )
    background, foreground = labels == 0, (labels != 0) & (labels != 255)
    expected = 0.5 * per_pixel[background].mean() + 0.5 * per_pixel[foreground].mean()
    torch.testing.assert_close(segmentation_loss(logits, labels), expected)
    only_background = torch.where(labels == 255, 255, 0)
    assert torch.isfinite(segmentation_loss(logits, only_background))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_class_token_contrast_matches_the_loop_form(seed):
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.nn.functional.normalize(torch.randn(3, 2, 8, generator=generator), dim=-1)
    student = torch.nn.functional.normalize(torch.randn(3, 6, 8, generator=generator), dim=-1)
    positive = torch.rand(3, 6, generator=generator) < 0.5
    positive[:, :2] = True
    positive[1, 2:] = True  # an image without negatives
    # ToCo's CTCLoss_neg as loops (the benchmark's reference), without its stray term.
    expected = class_token_contrast_loops(teacher.double(), student.double(), positive, 0.5)
    actual = class_token_contrast_loss(teacher, student, positive, 0.5)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6)


def test_class_token_contrast_does_not_overflow():
    teacher = torch.full((1, 2, 4), 10.0)
    student = torch.full((1, 3, 4), 10.0)
    positive = torch.tensor([[True, True, False]])
    loss = class_token_contrast_loss(teacher, student, positive, temperature=0.01)
    assert torch.isfinite(loss)


def test_local_crops_are_windows_around_uncertain_pixels():
    torch.manual_seed(4)
    images = torch.arange(2 * 3 * 12 * 12, dtype=torch.float32).view(2, 3, 12, 12)
    roi = torch.full((2, 12, 12), 2)
    roi[0, 5, 7] = 1  # one uncertain pixel: not enough candidates, fallback to anywhere
    roi[1, 3:9, 3:9] = 0  # many background pixels inside the margin
    crops, positive = sample_local_crops(images, roi, count=4, size=4, negative_ratio=0.2)
    assert crops.shape == (2, 4, 3, 4, 4) and positive.shape == (2, 4)
    for crop in crops[1]:
        # A window of the image: every value found at the matching offsets.
        top_left = int(crop[0, 0, 0].item()) - int(images[1, 0, 0, 0].item())
        row, column = divmod(top_left, 12)
        torch.testing.assert_close(crop, images[1, :, row : row + 4, column : column + 4])
        centre = roi[1, row + 2, column + 2]
        assert centre <= 1
    # Image 1's centres lie in the background block, so its crops are mostly ROI 0.
    assert not positive[1].all()


def test_the_reference_structured_step_computes_the_same_losses(model):
    """The benchmark's baseline: same losses, computed the reference code's way."""
    batch = make_batch(5)
    torch.manual_seed(11)
    fused = model(batch, iteration=5000)
    model.backbone.set_fused_attention(False)
    try:
        torch.manual_seed(11)
        reference = reference_training_step(model, batch, iteration=5000)
    finally:
        model.backbone.set_fused_attention(True)
    for name, value in fused.terms.items():
        torch.testing.assert_close(reference.terms[name], value, rtol=2e-4, atol=2e-5, msg=name)
    assert torch.equal(reference.seg_labels, fused.seg_labels)
    torch.testing.assert_close(reference.total, fused.total, rtol=2e-4, atol=2e-5)


def test_classifier_pooling_and_cams_share_weights():
    from wsss_fast.models.heads import TokenClassifier

    classifier = TokenClassifier(6, 4)
    token_map = torch.randn(2, 6, 3, 5)
    cams = classifier.cams(token_map)
    # Average pooling commutes with the 1x1 weights: the logits are the mean CAM.
    torch.testing.assert_close(classifier.logits(token_map, "avg"), cams.mean(dim=(2, 3)))
    expected_max = token_map.amax(dim=(2, 3)) @ classifier.weight.t()
    torch.testing.assert_close(classifier.logits(token_map), expected_max)
    with pytest.raises(ValueError, match="pooling must be"):
        classifier.logits(token_map, "sum")
