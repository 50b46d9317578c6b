"""Pixel-level self-supervision: the SupportNet is an exact EMA that never gets a
gradient, the RCM and MAM losses behave at their edges, the step matches its plain form."""

import copy
import json

import pytest
import torch

from wsss_fast import train as trainer
from wsss_fast.config import ModelConfig, PixelSupConfig, build_config
from wsss_fast.data import SyntheticConfig, generate_synthetic_dataset
from wsss_fast.methods import PixelSup, build_method
from wsss_fast.methods.pixel_sup import (
    multi_scale_attention_loss,
    normalize_cams_fixed_range,
    prototype_contrast_loss,
)
from wsss_fast.reference.pixel_sup_step import reference_training_step, regional_contrast

NUM_CLASSES = 5
CROP = 64
MOMENTUM = 0.9


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = PixelSupConfig(
        support_momentum=MOMENTUM, projection_dim=16, par_dilations=(1, 2), par_iterations=3
    )
    return PixelSup(ModelConfig(backbone="vit_tiny_patch16_224"), config, NUM_CLASSES, CROP)


@pytest.fixture
def trained_model(model):
    """The module model after a perturbation of MainNet, so that it differs from the
    SupportNet (a fresh model has both equal)."""
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


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


def test_every_term_is_finite_and_weighted_by_the_schedule(model):
    step = model(make_batch(1), iteration=0)
    assert set(step.terms) == {"cls", "rcm", "mam", "seg"}
    for name, value in step.terms.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    assert step.weights == {"cls": 1.0, "rcm": 0.0, "mam": 0.0, "seg": 0.0}
    later = model(make_batch(1), iteration=2000)
    assert later.weights == {"cls": 1.0, "rcm": 0.1, "mam": 0.1, "seg": 0.1}
    assert step.seg_labels.shape == (3, CROP, CROP)


def test_gradients_reach_only_what_the_spec_says(trained_model):
    model = trained_model
    step = model(make_batch(2), iteration=5000)
    terms = step.terms
    assert gradient_owners(model, terms["cls"]) == {"backbone", "classifier"}
    # RCM: MainNet's features (projection and encoder); prototypes are the SupportNet's.
    assert gradient_owners(model, terms["rcm"]) == {"backbone", "projection"}
    # MAM: MainNet's CAM; the multi-scale target is the SupportNet's.
    assert gradient_owners(model, terms["mam"]) == {"backbone", "classifier"}
    assert gradient_owners(model, terms["seg"]) == {"backbone", "seg_head"}
    model.zero_grad(set_to_none=True)
    step.total.backward()
    support = list(model.support.parameters())
    assert support and all(not p.requires_grad and p.grad is None for p in support)
    assert not model.support.training  # eval mode even while MainNet trains


def test_the_support_net_changes_only_through_after_step(trained_model):
    model = trained_model
    before = [p.detach().clone() for p in model.support.parameters()]
    backbone, heads = model.parameter_groups()
    assert not {id(p) for p in model.support.parameters()} & {id(p) for p in backbone + heads}
    optimizer = torch.optim.AdamW([*backbone, *heads], lr=1e-3)
    step = model(make_batch(3), iteration=5000)
    optimizer.zero_grad(set_to_none=True)
    step.total.backward()
    optimizer.step()
    for old, new in zip(before, model.support.parameters(), strict=True):
        assert torch.equal(old, new)

    main = [
        p.detach().clone()
        for module in (model.backbone, model.classifier, model.projection)
        for p in module.parameters()
    ]
    model.after_step()
    updated = list(model.support.parameters())
    assert len(updated) == len(main) == len(before)
    changed = 0
    for old, current, new in zip(before, main, updated, strict=True):
        expected = MOMENTUM * old + (1 - MOMENTUM) * current
        torch.testing.assert_close(new, expected, rtol=1e-6, atol=1e-7)
        changed += int(not torch.equal(new, old))
    assert changed == len(updated)  # every parameter moved (MainNet was perturbed)


def test_rcm_is_zero_with_zero_gradient_without_labelled_tokens():
    features = torch.randn(2, 6, 4, requires_grad=True)
    support = torch.randn(2, 6, 4)
    labels = torch.full((2, 6), 255)
    loss = prototype_contrast_loss(features, support, labels, num_classes=3, temperature=0.1)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(features.grad, torch.zeros_like(features))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rcm_matches_the_loop_form(seed, model):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(3, 10, 8, generator=generator, dtype=torch.float64)
    support = torch.randn(3, 10, 8, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES + 1, (3, 10), generator=generator)
    labels[torch.rand(3, 10, generator=generator) < 0.3] = 255
    labels[1] = 255  # an image without labelled tokens
    expected = regional_contrast(model, features, support, labels)
    actual = prototype_contrast_loss(
        features, support, labels, NUM_CLASSES, model.config.contrast_temperature
    )
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6)
    assert actual > 0


def test_mam_gradient_is_zero_where_the_target_is_not_larger():
    generator = torch.Generator().manual_seed(0)
    raw = torch.randn(2, 3, 4, 5, generator=generator, requires_grad=True)
    target = torch.rand(2, 3, 4, 5, generator=generator)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    valid = torch.ones(2, 4, 5, dtype=torch.bool)
    valid[1, :, 3:] = False
    cams = normalize_cams_fixed_range(raw)
    loss = multi_scale_attention_loss(cams, target, labels, valid)
    loss.backward()
    counted = labels[:, :, None, None].bool() & valid[:, None]
    pulled = (target > cams.detach()) & counted
    assert pulled.any() and (~pulled & counted).any()
    assert torch.equal(raw.grad[~pulled], torch.zeros_like(raw.grad[~pulled]))
    # Where it pulls a positive CAM, the gradient raises it; a CAM <= 0 gets no pull.
    positive = raw.detach() > 0
    assert (raw.grad[pulled & positive] < 0).all()
    assert (pulled & ~positive).any() and (raw.grad[~positive] == 0).all()
    expected = (target - cams.detach()).clamp(min=0)[counted].sum() / counted.sum()
    torch.testing.assert_close(loss, expected)


def test_mam_stays_bounded_when_a_cam_is_negative_everywhere():
    raw = -torch.rand(1, 2, 4, 4) * 1e-3  # an untrained class: negative everywhere
    target = torch.ones(1, 2, 4, 4)
    loss = multi_scale_attention_loss(
        normalize_cams_fixed_range(raw),
        target,
        torch.ones(1, 2),
        torch.ones(1, 4, 4, dtype=torch.bool),
    )
    assert loss.item() == 1.0  # normalised to 0, not divided by a vanishing peak


def test_a_fully_ignored_batch_gives_finite_losses(trained_model):
    model = trained_model
    empty = torch.zeros(3, 4, dtype=torch.int64)  # no image pixel in any crop
    step = model(make_batch(4, boxes=empty), iteration=5000)
    assert (step.seg_labels == 255).all()
    for name in ("seg", "rcm", "mam"):
        assert step.terms[name].item() == 0.0, name
    for name, value in step.terms.items():
        assert torch.isfinite(value), name
    model.zero_grad(set_to_none=True)
    step.total.backward()
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert torch.isfinite(parameter.grad).all(), name
    assert model.seg_head.layers[0].weight.grad.abs().sum() == 0


def test_the_reference_structured_step_computes_the_same_losses(trained_model):
    """The benchmark's baseline: same losses, computed the plain way."""
    model = trained_model
    batch = make_batch(5, boxes=torch.tensor([[0, CROP, 0, CROP], [8, 56, 0, 40], [0, 64, 16, 64]]))
    fused = model(batch, iteration=5000)
    model.backbone.set_fused_attention(False)
    model.support.backbone.set_fused_attention(False)
    try:
        reference = reference_training_step(model, batch, iteration=5000)
    finally:
        model.backbone.set_fused_attention(True)
        model.support.backbone.set_fused_attention(True)
    for name, value in fused.terms.items():
        torch.testing.assert_close(reference.terms[name], value, rtol=2e-4, atol=2e-5, msg=name)
    assert fused.terms["rcm"] > 0 and fused.terms["mam"] > 0
    assert torch.equal(reference.seg_labels, fused.seg_labels)
    torch.testing.assert_close(reference.total, fused.total, rtol=2e-4, atol=2e-5)


def test_bad_config_values_name_their_key():
    with pytest.raises(ValueError, match=r"pixel_sup\.support_momentum"):
        PixelSupConfig(support_momentum=1.0)
    with pytest.raises(ValueError, match=r"pixel_sup\.cam_scales"):
        PixelSupConfig(cam_scales=(0.5, 1.5))
    with pytest.raises(ValueError, match="background_threshold"):
        PixelSupConfig(foreground_threshold=0.1, background_threshold=0.2)
    with pytest.raises(ValueError, match=r"pixel_sup\.contrast_temperature"):
        PixelSupConfig(contrast_temperature=0.0)


def test_the_registry_builds_it():
    config = build_config(
        [
            {
                "method": "pixel_sup",
                "model": {"backbone": "vit_tiny_patch16_224"},
                "augmentation": {"crop_size": 64},
                "pixel_sup": {"projection_dim": 8},
            }
        ]
    )
    assert isinstance(build_method(config, 3), PixelSup)


def test_a_short_run_through_the_trainer(tmp_path):
    data = generate_synthetic_dataset(
        tmp_path / "synthetic",
        SyntheticConfig(seed=3, num_train=8, num_val=4, image_size=64),
        progress=False,
    )
    out = tmp_path / "run"
    arguments = [
        "--method", "pixel_sup", "--data", str(data), "--out", str(out), "--iters", "3",
        "--backbone", "vit_tiny_patch16_224", "--batch-size", "2",
        "augmentation.crop_size=64", "augmentation.global_view_count=0",
        "pixel_sup.projection_dim=16", "pixel_sup.par_dilations=[1,2]",
        "pixel_sup.seg_start_iter=1", "pixel_sup.self_supervision_start_iter=1",
        "optim.warmup_iters=2", "eval.interval=3", "eval.batch_size=4",
        "eval.overlay_count=2", "data.num_workers=0", "log_interval=1",
    ]  # fmt: skip
    assert trainer.main(arguments) == 0
    final = json.loads((out / "final_metrics.json").read_text())
    for key in ("cam_miou", "seg_miou", "seg_crf_miou"):
        assert 0.0 <= final[key] <= 100.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if r["event"] == "train"]
    assert [r["iteration"] for r in losses] == [1, 2, 3]
    for record in losses:
        for name in ("cls", "rcm", "mam", "seg", "total"):
            assert torch.isfinite(torch.tensor(record[f"loss_{name}"])), name
