"""Pixel-level self-supervision training step: the fused path against the plain one.

One full step (forward, losses, backward, AdamW step, SupportNet EMA) of the same model
on the same batch, two ways:

- ``fused``: ``PixelSup.training_step`` - one SupportNet pass per scale (the scale-1
  pass gives both CAM and features), SDPA attention, vectorised region labels,
  prototypes, InfoNCE and MAM, batched PAR through the fused op, bf16 autocast on CUDA;
- ``reference``: ``wsss_fast.reference.pixel_sup_step`` - a second SupportNet pass for
  the features, explicit attention, loops over images and classes, per-image reference
  PAR, fp32.

Shapes: the VOC recipe on CUDA (ViT-B/16 at 448 px, batch 4, 20 classes; random
weights, which do not change the cost), and on CPU the built-in synthetic default (the
package's conv-stem ViT at 64 px). ``extra_info`` holds what 20k iterations (the VOC
schedule) would take at the measured speed.
"""

import dataclasses

import pytest
import torch

from bench.measure import time_fused_case
from wsss_fast.config import (
    CONFIG_DIR,
    ModelConfig,
    PixelSupConfig,
    TrainConfig,
    build_config,
    load_yaml,
)
from wsss_fast.methods import PixelSup
from wsss_fast.reference.pixel_sup_step import reference_training_step
from wsss_fast.train import build_optimizer

VOC_ITERATIONS = 20000


def case_setup(device: str) -> tuple[ModelConfig, PixelSupConfig, int, int, int]:
    """(model config, method config, classes, crop, batch) for the device's case."""
    if device == "cuda":
        return ModelConfig(backbone="vit_base_patch16_224"), PixelSupConfig(), 20, 448, 4
    config = build_config([load_yaml(CONFIG_DIR / "pixel_sup_synthetic.yaml")])
    model = dataclasses.replace(config.model, pretrained=None)
    return model, config.pixel_sup, 8, config.augmentation.crop_size, config.batch_size


@pytest.mark.parametrize("path", ["fused", "reference"])
def test_pixel_sup_training_step(benchmark, path):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_config, method_config, classes, crop, batch_size = case_setup(device)
    torch.manual_seed(0)
    model = PixelSup(model_config, method_config, classes, crop).to(device)
    config = TrainConfig(method="pixel_sup", model=model_config, pixel_sup=method_config)
    optimizer, scheduler = build_optimizer(config, model)
    generator = torch.Generator().manual_seed(0)
    labels = (torch.rand(batch_size, classes, generator=generator) < 0.15).float()
    labels[:, 0] = 1.0
    batch = {
        "image": torch.randn(batch_size, 3, crop, crop, generator=generator),
        "label": labels,
        "valid_box": torch.tensor([[0, crop, 0, crop]] * batch_size),
    }
    batch = {key: value.to(device) for key, value in batch.items()}
    on_cuda = device == "cuda"
    for backbone in (model.backbone, model.support.backbone):
        backbone.set_fused_attention(path == "fused")
    # Every loss term on.
    iteration = max(method_config.seg_start_iter, method_config.self_supervision_start_iter)

    def step():
        if path == "fused":
            with torch.autocast(device, dtype=torch.bfloat16, enabled=on_cuda):
                output = model.training_step(batch, iteration)
        else:
            output = reference_training_step(model, batch, iteration)
        optimizer.zero_grad(set_to_none=True)
        output.total.backward()
        optimizer.step()
        scheduler.step()
        model.after_step()
        if on_cuda:
            torch.cuda.synchronize()

    time_fused_case(
        benchmark,
        step,
        group=f"pixel_sup training step {model_config.backbone} {crop}px batch {batch_size} "
        f"{device}",
        backend=path,
        shape=(batch_size, 3, crop, crop),
        dtype="bfloat16" if path == "fused" and on_cuda else "float32",
        device=device,
        cpu_rounds=3,
    )
    if benchmark.stats is not None:
        seconds = benchmark.stats.stats.mean
        benchmark.extra_info["hours_for_20k_iterations"] = seconds * VOC_ITERATIONS / 3600
