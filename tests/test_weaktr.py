"""WeakTr: both steps' losses and gradients, the clipping rule, the two-step trainer."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from wsss_fast import infer
from wsss_fast import train as trainer
from wsss_fast.checkpoint import load_checkpoint
from wsss_fast.config import ModelConfig, WeakTrConfig, WeakTrSegmentationConfig
from wsss_fast.data import SyntheticConfig, generate_synthetic_dataset, read_label_png
from wsss_fast.methods import WeakTrCAM, WeakTrSegmenter
from wsss_fast.methods.weaktr import crf_from_labels, gradient_clipped_cross_entropy
from wsss_fast.reference.weaktr_step import reference_training_step

NUM_CLASSES = 4
CROP = 64
TINY_MODEL = ModelConfig(backbone="vit_tiny_patch16_224")

# A tiny two-step WeakTr run: 2 images a step, 2 + 2 iterations, small evaluation.
TINY = [
    "--method",
    "weaktr",
    "--backbone",
    "vit_tiny_patch16_224",
    "--batch-size",
    "2",
    "augmentation.crop_size=64",
    "augmentation.global_view_count=0",
    "optim.warmup_iters=1",
    "eval.interval=2",
    "eval.batch_size=4",
    "eval.overlay_count=2",
    "data.num_workers=0",
    "checkpoint_interval=1",
    "log_interval=1",
    "weaktr.pseudo_label_scales=[1.0]",
    "weaktr.crf_iterations=2",
    "weaktr.seg.iters=2",
    "weaktr.seg.batch_size=2",
    "weaktr.seg.clip_window=16",
    "weaktr.seg.augmentation.crop_size=64",
    "weaktr.seg.eval.seg_scales=[1.0]",
    "weaktr.seg.eval.batch_size=4",
    "weaktr.seg.eval.interval=2",
    "weaktr.seg.eval.overlay_count=2",
]


@pytest.fixture(scope="module")
def cam_model():
    torch.manual_seed(0)
    return WeakTrCAM(TINY_MODEL, WeakTrConfig(), NUM_CLASSES, CROP)


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    return WeakTrSegmenter(TINY_MODEL, WeakTrSegmentationConfig(clip_window=16), NUM_CLASSES, CROP)


def make_batch(seed, batch=2):
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.rand(batch, NUM_CLASSES, generator=generator) < 0.5).float()
    labels[:, 0] = 1.0
    masks = torch.randint(0, NUM_CLASSES + 1, (batch, CROP, CROP), generator=generator)
    masks[:, :8] = 255
    return {
        "image": torch.randn(batch, 3, CROP, CROP, generator=generator),
        "label": labels,
        "mask": masks,
    }


def gradient_owners(model, loss):
    """The top-level modules whose parameters get a non-zero gradient from ``loss``."""
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {
        name.split(".")[0]
        for name, parameter in model.named_parameters()
        if parameter.grad is not None and parameter.grad.abs().sum() > 0
    }


def test_cam_step_terms_are_finite(cam_model):
    step = cam_model(make_batch(1), iteration=0)
    assert set(step.terms) == {"cls", "coarse", "fine"}
    assert step.weights == {"cls": 1.0, "coarse": 1.0, "fine": 1.0}
    for name, value in step.terms.items():
        assert value.dim() == 0 and torch.isfinite(value), name


def test_cam_step_gradients_reach_only_what_the_spec_says(cam_model):
    terms = cam_model(make_batch(2), iteration=0).terms
    assert gradient_owners(cam_model, terms["cls"]) == {"backbone"}
    assert gradient_owners(cam_model, terms["coarse"]) == {"backbone", "cam_head"}
    # Attention maps, the AAF's input features and the coarse CAM are detached in the
    # fine-CAM path: the fine loss trains the fusion alone.
    assert gradient_owners(cam_model, terms["fine"]) == {"attention_fusion"}


def test_the_fused_map_is_the_weighted_mean_of_the_detached_maps(cam_model):
    images = make_batch(3)["image"]
    output = cam_model.backbone(images)
    fused, weights = cam_model.fused_attention(output)
    assert weights.shape == (2, 12 * 3) and bool(((weights > 0) & (weights < 1)).all())
    assert fused.requires_grad
    maps = torch.cat(
        [
            (q @ k.transpose(-2, -1) * cam_model.attention_scale).softmax(-1)
            for q, k in zip(output.queries, output.keys, strict=True)
        ],
        dim=1,
    )
    expected = (maps * weights[:, :, None, None]).mean(dim=1)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)
    # The maps carry no gradient: only the weights do.
    grad_q = torch.autograd.grad(fused.sum(), output.queries[0], allow_unused=True)[0]
    assert grad_q is None


def test_the_reference_structured_step_computes_the_same_losses(cam_model):
    batch = make_batch(4)
    cam_model.eval()  # no drop-path: both steps see the same network
    try:
        fused = cam_model(batch, iteration=0)
        cam_model.backbone.set_fused_attention(False)
        reference = reference_training_step(cam_model, batch)
    finally:
        cam_model.backbone.set_fused_attention(True)
        cam_model.train()
    for name, value in fused.terms.items():
        torch.testing.assert_close(reference.terms[name], value, rtol=2e-4, atol=2e-5, msg=name)
    torch.testing.assert_close(reference.total, fused.total, rtol=2e-4, atol=2e-5)


def test_pseudo_masks_and_cams(cam_model):
    batch = make_batch(5)
    cams = cam_model.multi_scale_cams(batch["image"], (1.0, 1.25))
    assert cams.shape == (2, NUM_CLASSES, CROP, CROP)
    assert float(cams.min()) >= 0 and float(cams.max()) <= 1
    masks = cam_model.pseudo_masks(batch["image"], batch["label"])
    assert masks.shape == (2, CROP, CROP) and masks.dtype == torch.int64
    for image in range(2):
        present = set(torch.unique(masks[image]).tolist())
        allowed = {0} | {c + 1 for c in range(NUM_CLASSES) if batch["label"][image, c]}
        assert present <= allowed


def test_crf_from_labels_matches_the_pydensecrf_api():
    import numpy as np

    import wsss_fast.crf as dcrf

    generator = torch.Generator().manual_seed(6)
    images = torch.randint(0, 256, (1, 3, 12, 10), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 3, (1, 12, 10), generator=generator)
    ours = crf_from_labels(
        images, labels, 3, 0.7, gaussian=(3.0, 3.0), bilateral=(20.0, 5.0, 3.0), iterations=5
    )
    crf = dcrf.DenseCRF2D(10, 12, 3)
    crf.setUnaryEnergy(dcrf.unary_from_labels(labels[0].numpy(), 3, 0.7, zero_unsure=False))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(
        sxy=20, srgb=5, rgbim=np.ascontiguousarray(images[0].permute(1, 2, 0).numpy()), compat=3
    )
    expected = np.asarray(crf.inference(5)).argmax(0).reshape(12, 10)
    assert np.array_equal(ours[0].numpy(), expected)


def test_gradient_clipping_by_hand():
    # Two 2x2 windows over a 2x4 map; logits chosen so per-pixel losses are known.
    losses = torch.tensor([[[0.1, 0.1, 0.1, 2.0], [0.1, 0.1, 0.1, 0.1]]])
    labels = torch.zeros(1, 2, 4, dtype=torch.int64)
    # Two classes: CE = log(1 + e^{-d}) for margin d; solve d for each wanted loss.
    margins = -torch.log(torch.expm1(losses))
    logits = torch.stack([margins, torch.zeros_like(margins)], dim=1).requires_grad_()
    mean = losses.mean()  # 0.3375 < 1.2: clipping on
    # Left window mean 0.1 is floored at the global mean; the right window's mean is
    # (0.1 + 2.0 + 0.1 + 0.1) / 4 = 0.575, which caps its 2.0 pixel.
    expected = (losses.sum() - 2.0 + 0.575) / 8
    loss = gradient_clipped_cross_entropy(logits, labels, window=2, threshold=1.2)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert logits.grad[0, :, 0, 3].abs().sum() == 0  # the capped pixel stops pushing
    assert logits.grad[0, :, 0, 0].abs().sum() > 0
    assert mean < 1.2

    # A tiny window: every pixel is its own window; caps are max(loss, mean) -> nothing
    # is clipped, and the loss is the plain mean.
    plain = gradient_clipped_cross_entropy(logits, labels, window=1, threshold=1.2)
    torch.testing.assert_close(plain, mean, rtol=1e-5, atol=1e-6)
    # Above the threshold nothing is clipped either.
    high = gradient_clipped_cross_entropy(logits, labels, window=2, threshold=0.2)
    torch.testing.assert_close(high, mean, rtol=1e-5, atol=1e-6)
    # The global-mean floor: pixels under the global mean are never capped below it.
    floor_losses = torch.tensor([[[0.1, 0.1, 0.5, 0.5]]])
    floor_logits = torch.stack([-torch.log(torch.expm1(floor_losses)), torch.zeros(1, 1, 4)], 1)
    floored = gradient_clipped_cross_entropy(
        floor_logits, torch.zeros(1, 1, 4, dtype=torch.int64), window=2, threshold=1.2
    )
    # Left window (mean 0.1) is floored at 0.3: its pixels (0.1) stay; the right
    # window's mean 0.5 caps nothing: the plain mean.
    torch.testing.assert_close(floored, floor_losses.mean(), rtol=1e-5, atol=1e-6)


def test_gradient_clipping_ignores_pixels_and_is_zero_when_all_are_ignored():
    logits = torch.randn(2, 3, 5, 7, requires_grad=True)
    ignored = torch.full((2, 5, 7), 255)
    loss = gradient_clipped_cross_entropy(logits, ignored, window=3, threshold=1.2)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    labels = torch.randint(0, 3, (2, 5, 7))
    labels[0, :2] = 255
    per_pixel = F.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    high = gradient_clipped_cross_entropy(logits, labels, window=3, threshold=0.0)
    torch.testing.assert_close(high, per_pixel[labels != 255].mean())


def test_segmenter_step_and_gradients(segmenter):
    step = segmenter(make_batch(7), iteration=0)
    assert set(step.terms) == {"seg"} and torch.isfinite(step.total)
    assert gradient_owners(segmenter, step.total) == {"backbone", "decoder"}
    logits = segmenter.multi_scale_segment(make_batch(7)["image"], (1.0, 0.5))
    assert logits.shape == (2, NUM_CLASSES + 1, CROP, CROP)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "synthetic"
    config = SyntheticConfig(seed=3, num_train=6, num_val=4, image_size=64)
    return generate_synthetic_dataset(root, config, progress=False)


def run(dataset, out, *extra):
    return trainer.main(["--data", str(dataset), "--out", str(out), "--iters", "2", *TINY, *extra])


def test_both_steps_end_to_end_and_resume_in_either(dataset, tmp_path, monkeypatch):
    out = tmp_path / "whole"
    assert run(dataset, out) == 0
    final = json.loads((out / "final_metrics.json").read_text())
    for key in ("cam_miou", "seg_miou", "seg_crf_miou"):
        assert 0.0 <= final[key] <= 100.0
    assert final["iterations"] == {"cam": 2, "seg": 2}
    masks = sorted((out / "pseudo_labels").glob("*.png"))
    assert len(masks) == 6 and read_label_png(masks[0]).shape == (64, 64)
    cam_final = json.loads((out / "cam" / "final_metrics.json").read_text())
    assert "cam_miou" in cam_final and "seg_miou" not in cam_final
    with pytest.raises(SystemExit):  # the same directory again without --resume
        run(dataset, out)
    # Inference from the run directory uses the last step, the segmenter.
    assert infer.resolve_checkpoint(out) == out / "seg" / "checkpoints" / "best.pt"
    images = Path(dataset) / "JPEGImages"
    arguments = ["--checkpoint", str(out), "--images", str(images), "--out", str(out / "m")]
    assert infer.main(arguments) == 0
    assert len(list((out / "m").glob("*.png"))) == len(list(images.glob("*.jpg")))

    # Interrupted in step 1, resumed: the same weights as the uninterrupted run.
    interrupted = tmp_path / "interrupted"
    original_cam_step = WeakTrCAM.training_step

    def crash_cam(self, batch, iteration):
        if iteration == 1:
            raise KeyboardInterrupt("simulated crash")
        return original_cam_step(self, batch, iteration)

    monkeypatch.setattr(WeakTrCAM, "training_step", crash_cam)
    with pytest.raises(KeyboardInterrupt):
        run(dataset, interrupted)
    monkeypatch.setattr(WeakTrCAM, "training_step", original_cam_step)
    assert load_checkpoint(interrupted / "cam")["iteration"] == 1
    assert not (interrupted / "seg").exists()

    # Resumed, then interrupted in step 2 after the pseudo-masks are written.
    original_seg_step = WeakTrSegmenter.training_step

    def crash_seg(self, batch, iteration):
        if iteration == 1:
            raise KeyboardInterrupt("simulated crash")
        return original_seg_step(self, batch, iteration)

    monkeypatch.setattr(WeakTrSegmenter, "training_step", crash_seg)
    with pytest.raises(KeyboardInterrupt):
        trainer.main(["--resume", str(interrupted)])
    monkeypatch.setattr(WeakTrSegmenter, "training_step", original_seg_step)
    assert len(list((interrupted / "pseudo_labels").glob("*.png"))) == 6
    assert load_checkpoint(interrupted / "seg")["iteration"] == 1
    assert trainer.main(["--resume", str(interrupted)]) == 0
    assert json.loads((interrupted / "final_metrics.json").read_text())["iterations"] == {
        "cam": 2,
        "seg": 2,
    }
    for step in ("cam", "seg"):
        expected = load_checkpoint(out / step)["model"]
        actual = load_checkpoint(interrupted / step)["model"]
        for name, tensor in expected.items():
            assert torch.equal(actual[name], tensor), (step, name)
    for a, b in zip(
        sorted((out / "pseudo_labels").glob("*.png")),
        sorted((interrupted / "pseudo_labels").glob("*.png")),
        strict=True,
    ):
        assert (read_label_png(a) == read_label_png(b)).all(), a.name


def test_a_single_step_can_be_run_alone(dataset, tmp_path):
    out = tmp_path / "steps"
    assert run(dataset, out, "--stage", "cam") == 0
    assert (out / "cam" / "final_metrics.json").is_file()
    assert not (out / "seg").exists() and not (out / "final_metrics.json").exists()
    # Step 1 ends with its pseudo-masks.
    assert len(list((out / "pseudo_labels").glob("*.png"))) == 6
    assert trainer.main(["--resume", str(out), "--stage", "seg"]) == 0
    final = json.loads((out / "final_metrics.json").read_text())
    assert {"cam_miou", "seg_miou", "seg_crf_miou"} <= set(final)
