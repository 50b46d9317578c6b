"""APC: losses finite, gradients only where the spec says, AKP, PCL and equivariance."""

import dataclasses
import json

import pytest
import torch

import wsss_fast.methods.apc as apc_module
from wsss_fast import train as trainer
from wsss_fast.config import APCConfig, ModelConfig, build_config, parse_override
from wsss_fast.data import SyntheticConfig, generate_synthetic_dataset
from wsss_fast.methods import APC
from wsss_fast.methods.apc import equivariance_loss, image_score_bce, random_zoom_flip, warp
from wsss_fast.reference.apc_step import reference_training_step

NUM_CLASSES = 5
CROP = 64
IDENTITY = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = APCConfig(par_dilations=(1, 2), par_iterations=3, seg_start_iter=10)
    return APC(
        ModelConfig(backbone="vit_tiny_patch16_224", seg_head_channels=32),
        config,
        NUM_CLASSES,
        CROP,
    )


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


@pytest.fixture
def confident_model(model):
    """The model with every patch pseudo-labelled (threshold 0), restored afterwards."""
    original = model.config
    model.config = dataclasses.replace(original, confidence_threshold=0.0)
    yield model
    model.config = original


def test_every_term_is_finite_and_weighted_by_the_schedule(model):
    step = model(make_batch(1), iteration=0)
    assert set(step.terms) == {"bce", "pcl", "equivariance", "seg"}
    for name, value in step.terms.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    assert step.weights["seg"] == 0.0  # before seg_start_iter
    later = model(make_batch(1), iteration=10)
    config = model.config
    assert later.weights == {
        "bce": config.bce_weight,
        "pcl": config.pcl_weight,
        "equivariance": config.equivariance_weight,
        "seg": config.seg_weight,
    }
    assert step.seg_labels.shape == (3, CROP, CROP)


def test_gradients_reach_only_what_the_spec_says(confident_model):
    model = confident_model
    terms = model(make_batch(2), iteration=100).terms
    assert gradient_owners(model, terms["bce"]) == {"backbone", "patch_classifier"}
    # PCL trains the encoder only; its labels are the (detached) patch predictions.
    assert gradient_owners(model, terms["pcl"]) == {"backbone"}
    assert gradient_owners(model, terms["equivariance"]) == {"backbone", "patch_classifier"}
    # Segmentation: its head and the encoder, not the classifier its labels came from.
    assert gradient_owners(model, terms["seg"]) == {"backbone", "seg_head"}


def test_adaptive_k_pooling_gradient_reaches_only_the_selected_patches(model, monkeypatch):
    captured = []
    pool = apc_module.adaptive_topk_pool

    def capturing_pool(scores, **options):
        scores.retain_grad()
        captured.append((scores, options))
        return pool(scores, **options)

    monkeypatch.setattr(apc_module, "adaptive_topk_pool", capturing_pool)
    step = model(make_batch(3), iteration=100)
    ((scores, options),) = captured
    num_patches = (CROP // 16) ** 2
    assert scores.shape == (3, NUM_CLASSES + 1, num_patches)  # background pooled too
    assert options == {"gamma": 0.5, "k_max": num_patches // 4}
    step.terms["bce"].backward()
    values = scores.detach()
    peak = values.amax(dim=-1, keepdim=True)
    k = (values >= 0.5 * peak).sum(-1).clamp(1, num_patches // 4)
    selected = scores.grad != 0
    assert torch.equal(selected.sum(-1), k)
    # The selected patches are the k highest of their row.
    lowest_selected = values.masked_fill(~selected, float("inf")).amin(-1)
    highest_unselected = values.masked_fill(selected, float("-inf")).amax(-1)
    assert (lowest_selected >= highest_unselected).all()
    assert (k < num_patches).any() and (k > 1).any()  # a real choice was made


def test_patch_contrast_uses_signed_similarity_and_the_margin(confident_model, monkeypatch):
    calls = []
    contrast = apc_module.token_contrast_loss

    def recording_contrast(tokens, labels, **options):
        calls.append((labels, options))
        return contrast(tokens, labels, **options)

    monkeypatch.setattr(apc_module, "token_contrast_loss", recording_contrast)
    confident_model(make_batch(4), iteration=0)
    ((labels, options),) = calls
    assert options == {"absolute": False, "margin": 0.0}
    assert (labels != 255).all()  # threshold 0: every patch takes part


def test_equivariance_is_zero_for_the_identity_and_exact_flips(model, monkeypatch):
    probabilities = torch.rand(2, 4, 5, 6).softmax(dim=1)
    identity = IDENTITY.expand(2, 2, 3)
    assert equivariance_loss(probabilities, probabilities, identity).item() < 1e-6
    flip = identity.clone()
    flip[:, 0, 0] = -1.0
    torch.testing.assert_close(warp(probabilities, flip), probabilities.flip(-1))
    assert equivariance_loss(probabilities, probabilities.flip(-1), flip).item() < 1e-6
    assert equivariance_loss(probabilities, probabilities, flip).item() > 0.1

    # Through the model: an identity view predicts what the image does.
    monkeypatch.setattr(
        apc_module, "random_zoom_flip", lambda batch, *_: IDENTITY.expand(batch, 2, 3).clone()
    )
    step = model(make_batch(5), iteration=0)
    assert step.terms["equivariance"].item() < 1e-4


def test_random_transforms_keep_zoomed_in_windows_inside():
    torch.manual_seed(0)
    theta = random_zoom_flip(200, (1.0, 2.0), 0.5, torch.device("cpu"))
    scale = theta[:, 1, 1]  # 1 / zoom
    assert torch.equal(theta[:, 0, 0].abs(), scale)
    assert ((theta[:, 0, 0] < 0).float().mean() - 0.5).abs() < 0.15
    assert (theta[:, :, 2].abs() <= 1 - scale[:, None] + 1e-6).all()  # window inside
    # Every sample lies inside the image (at worst half a pixel into the zero padding).
    shown = warp(torch.ones(200, 1, 8, 8), theta)
    assert shown.min() >= 0.5 - 1e-6


def test_no_confident_patch_gives_finite_losses(model):
    original = model.config
    model.config = dataclasses.replace(original, confidence_threshold=1.0)
    try:
        batch = make_batch(6)
        batch["label"][:, 1:] = 1.0  # all classes present: no patch reaches probability 1
        step = model(batch, iteration=100)
    finally:
        model.config = original
    assert (step.seg_labels == 255).all()
    assert step.terms["seg"].item() == 0.0
    assert step.terms["pcl"].item() == 0.5  # no valid pair
    check_finite_step(model, step)


def test_a_fully_ignored_crop_gives_finite_losses(model):
    empty = torch.zeros(3, 4, dtype=torch.int64)  # no image pixel in any crop
    step = model(make_batch(7, boxes=empty), iteration=100)
    assert (step.seg_labels == 255).all()
    assert step.terms["seg"].item() == 0.0
    assert step.terms["pcl"].item() == 0.5
    check_finite_step(model, step)


def check_finite_step(model, step):
    for name, value in step.terms.items():
        assert torch.isfinite(value), name
    model.zero_grad(set_to_none=True)
    step.total.backward()
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert torch.isfinite(parameter.grad).all(), name


def test_image_score_bce_is_finite_at_the_extremes():
    scores = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], requires_grad=True)
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = image_score_bce(scores, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(scores.grad).all()
    # Background (channel 0) is a positive for every image.
    perfect = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert image_score_bce(perfect, labels).item() < 1e-5


def test_the_reference_structured_step_computes_the_same_losses(confident_model):
    """The benchmark's baseline: same losses, computed the reference code's way."""
    model = confident_model
    batch = make_batch(8)
    torch.manual_seed(11)
    fused = model(batch, iteration=100)
    model.backbone.set_fused_attention(False)
    try:
        torch.manual_seed(11)
        reference = reference_training_step(model, batch, iteration=100)
    finally:
        model.backbone.set_fused_attention(True)
    for name, value in fused.terms.items():
        torch.testing.assert_close(reference.terms[name], value, rtol=2e-4, atol=2e-5, msg=name)
    assert torch.equal(reference.seg_labels, fused.seg_labels)
    torch.testing.assert_close(reference.total, fused.total, rtol=2e-4, atol=2e-5)


def test_multi_scale_outputs_have_the_evaluation_shapes(model):
    images = torch.randn(2, 3, 48, 64)
    cams = model.multi_scale_cams(images, (1.0, 0.5))
    assert cams.shape == (2, NUM_CLASSES, 48, 64) and cams.dtype == torch.float32
    assert cams.min() >= 0 and cams.max() <= 1
    logits = model.multi_scale_segment(images, (1.0,))
    assert logits.shape == (2, NUM_CLASSES + 1, 48, 64)


def test_the_patch_classifier_can_be_the_segmenter():
    torch.manual_seed(1)
    model = APC(
        ModelConfig(backbone="vit_tiny_patch16_224"),
        APCConfig(segmenter="patch_classifier"),
        NUM_CLASSES,
        CROP,
    )
    assert model.seg_head is None
    assert model.parameter_groups()[1] == [model.patch_classifier.weight]
    torch.manual_seed(3)
    step = model(make_batch(9), iteration=10000)
    assert set(step.terms) == {"bce", "pcl", "equivariance"} and step.seg_labels is None
    torch.manual_seed(3)
    reference = reference_training_step(model, make_batch(9), iteration=10000)
    assert set(reference.terms) == set(step.terms)
    for name, value in step.terms.items():
        torch.testing.assert_close(reference.terms[name], value, rtol=2e-4, atol=2e-5, msg=name)
    model.eval()
    images = torch.randn(2, 3, CROP, CROP)
    logits = model.multi_scale_segment(images, (1.0,))
    # Its softmax is the patch classifier's, upsampled, averaged with the flip's.
    with torch.no_grad():
        output = model.backbone(torch.cat([images, images.flip(-1)]))
        patch = model.patch_logits(output.patch_tokens, output.grid).softmax(dim=1)
        patch = torch.nn.functional.interpolate(patch, size=(CROP, CROP), mode="bilinear")
    expected = (patch[:2] + patch[2:].flip(-1)) / 2
    torch.testing.assert_close(logits.softmax(dim=1), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "override",
    [
        "apc.pooling_k_max_ratio=0",
        "apc.confidence_threshold=1.5",
        "apc.equivariance_scale_range=[1.5,1.0]",
        "apc.pcl_weight=-1",
        "apc.segmenter=crf",
    ],
)
def test_bad_values_name_their_key(override):
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=key):
        build_config([{"method": "apc"}, parse_override(override)])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "synthetic"
    config = SyntheticConfig(seed=3, num_train=8, num_val=4, image_size=64)
    return generate_synthetic_dataset(root, config, progress=False)


def test_a_short_run_trains_and_scores(dataset, tmp_path):
    out = tmp_path / "run"
    arguments = [
        "--method",
        "apc",
        "--data",
        str(dataset),
        "--out",
        str(out),
        "--iters",
        "2",
        "--backbone",
        "vit_tiny_patch16_224",
        "--batch-size",
        "2",
        "augmentation.crop_size=64",
        "model.seg_head_channels=32",
        "apc.par_dilations=[1,2]",
        "apc.seg_start_iter=1",
        "optim.warmup_iters=1",
        "eval.batch_size=4",
        "eval.overlay_count=2",
        "data.num_workers=0",
        "log_interval=1",
    ]
    assert trainer.main(arguments) == 0
    final = json.loads((out / "final_metrics.json").read_text())
    for key in ("cam_miou", "seg_miou", "seg_crf_miou"):
        assert 0.0 <= final[key] <= 100.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if r["event"] == "train"]
    assert [r["iteration"] for r in losses] == [1, 2]
    for record in losses:
        for name in ("bce", "pcl", "equivariance", "seg", "total"):
            assert torch.isfinite(torch.tensor(record[f"loss_{name}"])), name
