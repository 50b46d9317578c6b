"""The trainer end to end on a tiny synthetic dataset: run directory, resume, DDP, NaN."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wsss_fast import infer
from wsss_fast import train as trainer
from wsss_fast.checkpoint import load_checkpoint
from wsss_fast.config import (
    CONFIG_DIR,
    TrainConfig,
    build_config,
    load_yaml,
    parse_override,
)
from wsss_fast.data import SyntheticConfig, generate_synthetic_dataset, read_label_png
from wsss_fast.methods import ToCo

REPO = Path(__file__).resolve().parent.parent

# A tiny ToCo: small heads, 64 px crops, 2 images a step, few PAR rings.
TINY = [
    "--backbone",
    "vit_tiny_patch16_224",
    "--batch-size",
    "2",
    "augmentation.crop_size=64",
    "toco.local_crop_size=32",
    "toco.local_crop_count=2",
    "toco.projection_hidden_dim=32",
    "toco.projection_bottleneck_dim=16",
    "toco.projection_out_dim=16",
    "toco.par_dilations=[1,2]",
    "toco.seg_start_iter=1",
    "optim.warmup_iters=2",
    "eval.interval=2",
    "eval.batch_size=4",
    "eval.overlay_count=2",
    "data.num_workers=0",
    "checkpoint_interval=2",
    "log_interval=1",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "synthetic"
    config = SyntheticConfig(seed=3, num_train=8, num_val=4, image_size=64)
    return generate_synthetic_dataset(root, config, progress=False)


def run(dataset, out, iters, *extra):
    return trainer.main(
        ["--data", str(dataset), "--out", str(out), "--iters", str(iters), *TINY, *extra]
    )


def test_a_short_run_writes_the_run_directory(dataset, tmp_path):
    out = tmp_path / "run"
    assert run(dataset, out, 3, "eval.seg_scales=[1.0,0.5]") == 0
    final = json.loads((out / "final_metrics.json").read_text())
    # Several seg scales: the single-scale score is reported beside the multi-scale one.
    for key in ("cam_miou", "seg_miou", "seg_crf_miou", "seg_single_scale_miou"):
        assert 0.0 <= final[key] <= 100.0
    assert final["iterations"] == 3
    config = build_config([load_yaml(out / "config.yaml")])
    assert config.iters == 3 and config.model.backbone == "vit_tiny_patch16_224"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["event"] == "train"] == [1, 2, 3]
    assert [r["iteration"] for r in records if r["event"] == "eval"] == [2, 3]
    assert all(
        torch.isfinite(torch.tensor(r["loss_total"])) for r in records if r["event"] == "train"
    )
    assert (out / "checkpoints" / "latest.pt").is_file()
    assert (out / "checkpoints" / "best.pt").is_file()
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [
        "iter_0000002.png",
        "iter_0000003.png",
    ]
    assert load_checkpoint(out)["iteration"] == 3
    # The same directory again without --resume is refused, not overwritten.
    with pytest.raises(SystemExit):
        run(dataset, out, 3)

    # Inference with the run: one palette PNG per image, with and without the CRF.
    images = Path(dataset) / "JPEGImages"
    for crf in ([], ["--crf"]):
        masks = out / f"masks{len(crf)}"
        arguments = ["--checkpoint", str(out), "--images", str(images), "--out", str(masks)]
        assert infer.main([*arguments, "--batch-size", "5", "--scales", "1.0", "0.5", *crf]) == 0
        written = sorted(masks.glob("*.png"))
        assert [p.stem for p in written] == sorted(p.stem for p in images.glob("*.jpg"))
        labels = read_label_png(written[0])
        assert labels.shape == (64, 64) and labels.max() < 6


def test_an_interrupted_run_resumes_to_the_same_weights(dataset, tmp_path, monkeypatch):
    uninterrupted = tmp_path / "uninterrupted"
    assert run(dataset, uninterrupted, 4) == 0

    interrupted = tmp_path / "interrupted"
    original_step = ToCo.training_step

    def crash_at_iteration_3(self, batch, iteration):
        if iteration == 3:
            raise KeyboardInterrupt("simulated crash")
        return original_step(self, batch, iteration)

    monkeypatch.setattr(ToCo, "training_step", crash_at_iteration_3)
    with pytest.raises(KeyboardInterrupt):
        run(dataset, interrupted, 4)
    assert load_checkpoint(interrupted)["iteration"] == 2
    monkeypatch.setattr(ToCo, "training_step", original_step)
    with pytest.raises(SystemExit):  # a resumed run keeps its config
        trainer.main(["--resume", str(interrupted), "optim.lr=1e-3"])
    assert trainer.main(["--resume", str(interrupted)]) == 0

    expected = load_checkpoint(uninterrupted)
    actual = load_checkpoint(interrupted)
    assert actual["iteration"] == expected["iteration"] == 4
    for name, tensor in expected["model"].items():
        assert torch.equal(actual["model"][name], tensor), name
    for index, state in expected["optimizer"]["state"].items():
        assert torch.equal(actual["optimizer"]["state"][index]["exp_avg"], state["exp_avg"])
    assert actual["scheduler"] == expected["scheduler"]


def test_a_non_finite_loss_stops_the_run_and_keeps_the_checkpoint(
    dataset, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "nan"
    original_loss = ToCo.training_step

    def poisoned(self, batch, iteration):
        step = original_loss(self, batch, iteration)
        if iteration == 2:
            step.terms["seg"] = step.terms["seg"] * float("nan")
        return step

    monkeypatch.setattr(ToCo, "training_step", poisoned)
    assert run(dataset, out, 4) == 1
    message = capsys.readouterr().err
    assert "non-finite loss at iteration 2" in message and "seg=nan" in message
    checkpoint = load_checkpoint(out)
    assert checkpoint["iteration"] == 2
    for tensor in checkpoint["model"].values():
        assert torch.isfinite(tensor.float()).all()


def test_ddp_with_two_gloo_processes(dataset, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "wsss_fast.train",
        "--data",
        str(dataset),
        "--out",
        str(out),
        "--iters",
        "2",
        "--device",
        "cpu",
        *TINY,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["world_size"] == 2 and final["iterations"] == 2


def test_sampler_positions_do_not_depend_on_where_a_run_started():
    whole = list(trainer.IterationSampler(10, 2, 2, 1, 7, 0, 12))
    resumed = list(trainer.IterationSampler(10, 2, 2, 1, 7, 5, 12))
    assert resumed == whole[5 * 2 :]
    other_rank = list(trainer.IterationSampler(10, 2, 2, 0, 7, 0, 12))
    assert not set(whole[:4]) & set(other_rank[:4])  # the ranks split each iteration
    with pytest.raises(ValueError, match="fewer than batch_size"):
        trainer.IterationSampler(3, 2, 2, 0, 7, 0, 1)


def test_overrides_flags_and_config_files():
    assert parse_override("optim.lr=1e-4") == {"optim": {"lr": 1e-4}}
    assert parse_override("eval.cam_scales=[1.0, 0.5]") == {"eval": {"cam_scales": [1.0, 0.5]}}
    config = trainer.resolve_config(
        trainer.build_parser().parse_args(["--iters", "7", "toco.ptc_weight=0.3"])
    )
    assert config.iters == 7 and config.toco.ptc_weight == 0.3
    assert config.data.dataset == "synthetic"
    with pytest.raises(ValueError, match=r"unknown config key.*toco\.ptc_wieght"):
        build_config([parse_override("toco.ptc_wieght=1")])
    with pytest.raises(ValueError, match=r"optim\.lr must be a number"):
        build_config([parse_override("optim.lr=fast")])
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        assert isinstance(build_config([load_yaml(path)]), TrainConfig), path
