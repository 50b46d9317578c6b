"""WeakTr step-1 training step: the fused path against the reference code's structure.

One full step (forward, losses, backward, AdamW step) of the same CAM network on the
same batch, two ways:

- ``fused``: ``WeakTrCAM.training_step`` - SDPA attention with captured queries and
  keys, the AAF-weighted map from ``fuse_attention_maps`` (Triton on CUDA: the L*H
  maps never stored), bf16 autocast on CUDA;
- ``reference``: ``wsss_fast.reference.weaktr_step`` - explicit attention, every
  block's softmax map stacked, detached and cloned into (B, L*H, T, T), the weighted
  mean over it, fp32.

Shapes: WeakTr's VOC recipe on CUDA (DeiT-S/16 at 224 px, batch 64, 20 classes; random
weights, which do not change the cost), and on CPU the built-in synthetic default
(the package's conv-stem ViT at 64 px, batch 16, 8 classes).
"""

import pytest
import torch

from bench.measure import time_fused_case
from wsss_fast.config import CONFIG_DIR, TrainConfig, build_config, load_yaml
from wsss_fast.methods import WeakTrCAM
from wsss_fast.reference.weaktr_step import reference_training_step
from wsss_fast.train import build_optimizer


def case_setup(device: str) -> TrainConfig:
    """The run config of the device's case (its model without pretrained weights)."""
    name = "weaktr_voc.yaml" if device == "cuda" else "weaktr_synthetic.yaml"
    return build_config([load_yaml(CONFIG_DIR / name), {"model": {"pretrained": None}}])


@pytest.mark.parametrize("path", ["fused", "reference"])
def test_weaktr_cam_training_step(benchmark, path):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = case_setup(device)
    classes = 20 if device == "cuda" else 8
    crop = 224 if device == "cuda" else config.augmentation.crop_size
    batch_size = config.batch_size
    torch.manual_seed(0)
    model = WeakTrCAM(config.model, config.weaktr, classes, crop).to(device)
    optimizer, scheduler = build_optimizer(config, model)
    generator = torch.Generator().manual_seed(0)
    labels = (torch.rand(batch_size, classes, generator=generator) < 0.15).float()
    labels[:, 0] = 1.0
    batch = {
        "image": torch.randn(batch_size, 3, crop, crop, generator=generator).to(device),
        "label": labels.to(device),
    }
    on_cuda = device == "cuda"
    model.backbone.set_fused_attention(path == "fused")

    def step():
        if path == "fused":
            with torch.autocast(device, dtype=torch.bfloat16, enabled=on_cuda):
                output = model.training_step(batch, 0)
        else:
            output = reference_training_step(model, batch)
        optimizer.zero_grad(set_to_none=True)
        output.total.backward()
        optimizer.step()
        scheduler.step()
        if on_cuda:
            torch.cuda.synchronize()

    time_fused_case(
        benchmark,
        step,
        group=f"weaktr cam step {config.model.backbone} {crop}px batch {batch_size} {device}",
        backend=path,
        shape=(batch_size, 3, crop, crop),
        dtype="bfloat16" if path == "fused" and on_cuda else "float32",
        device=device,
        cpu_rounds=3,
    )
