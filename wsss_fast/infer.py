"""Segments a folder of images with a trained run.

    python -m wsss_fast.infer --checkpoint RUN --images DIR --out DIR [--crf]
        [--scales 1.0 0.5 1.5] [--batch-size N] [--device D]

``--checkpoint`` is a run directory (its ``checkpoints/best.pt``, else ``latest.pt``) or
a checkpoint file. Every .jpg/.jpeg/.png in ``--images`` gets ``<name>.png`` in
``--out``: a VOC-palette PNG of class indices. Inference is multi-scale + flip (the
run's ``eval.seg_scales`` unless ``--scales``), batched over images of equal size;
``--crf`` refines the probabilities with the dense CRF (``wsss_fast.ops.dense_crf``)
and the run's ``eval.crf_*`` parameters.
"""

import argparse
import dataclasses
import sys
from itertools import groupby
from pathlib import Path

import torch
from tqdm import tqdm

import wsss_fast.models  # noqa: F401  (registers the package's timm models)
from wsss_fast.checkpoint import load_checkpoint
from wsss_fast.config import TrainConfig, build_config, load_yaml
from wsss_fast.data.folder import read_rgb_image
from wsss_fast.data.palette import save_label_png
from wsss_fast.methods import WSSSMethod, build_method
from wsss_fast.ops import dense_crf
from wsss_fast.train import autocast_for, method_stages, resolve_device

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def resolve_checkpoint(path: Path) -> Path:
    """A run directory's best checkpoint (else its latest), or the file itself. The
    directory of a run in steps (WeakTr) stands for its last step, the segmenter."""
    run_config = path / "config.yaml"
    if path.is_dir() and not (path / "checkpoints").is_dir() and run_config.is_file():
        stages = method_stages(build_config([load_yaml(run_config)]))
        if stages:
            path = path / stages[-1].name
    if path.is_dir():
        for name in ("best.pt", "latest.pt"):
            candidate = path / "checkpoints" / name
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"run directory {path} holds no checkpoints/best.pt or latest.pt")
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {path} does not exist")
    return path


def load_model(checkpoint_path: Path, device: torch.device) -> tuple[WSSSMethod, TrainConfig]:
    """The trained network of a checkpoint (in eval mode) and its run's config."""
    checkpoint = load_checkpoint(checkpoint_path)
    config = build_config([checkpoint["config"]])
    # The checkpoint holds every weight: no pretrained file or download is needed.
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, pretrained=None))
    model = build_method(config, checkpoint["num_classes"])
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), config


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"--images {folder} does not exist or is no folder")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"--images {folder} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    return paths


@torch.no_grad()
def segment_folder(
    model: WSSSMethod,
    config: TrainConfig,
    images: list[Path],
    out_dir: Path,
    *,
    scales: tuple[float, ...],
    crf: bool,
    batch_size: int,
    device: torch.device,
) -> int:
    """Writes one PNG per image; returns the number written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    evaluation = config.eval
    decoded = ((path, read_rgb_image(path)) for path in images)
    written = 0
    progress = tqdm(total=len(images), desc="segment", unit="image")
    # Consecutive images of one size form the batches (sorted names keep a folder of
    # equal-sized images in full batches).
    for _, group in groupby(decoded, key=lambda item: item[1].shape):
        group = list(group)
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            pixels = torch.stack([torch.from_numpy(array) for _, array in chunk]).permute(
                0, 3, 1, 2
            )
            pixels = pixels.to(device)
            batch = model.normalization.normalize(pixels.float() / 255.0)
            with autocast_for(config, device):
                logits = model.multi_scale_segment(batch, scales)
            probabilities = logits.float().softmax(dim=1)
            if crf:
                probabilities = dense_crf(
                    pixels.contiguous(),
                    probabilities,
                    gaussian=evaluation.crf_gaussian,
                    bilateral=evaluation.crf_bilateral,
                    iterations=evaluation.crf_iterations,
                )
            labels = probabilities.argmax(dim=1).to(torch.uint8).cpu().numpy()
            for (path, _), label_map in zip(chunk, labels, strict=True):
                save_label_png(out_dir / f"{path.stem}.png", label_map)
                written += 1
            progress.update(len(chunk))
    progress.close()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m wsss_fast.infer",
        description="Segment a folder of images with a trained run (PNG label maps).",
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="run directory or .pt")
    parser.add_argument("--images", required=True, type=Path, help="folder of images")
    parser.add_argument("--out", required=True, type=Path, help="folder for the PNG masks")
    parser.add_argument("--crf", action="store_true", help="refine with the dense CRF")
    parser.add_argument("--scales", type=float, nargs="+", default=None, help="default: the run's")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    arguments = parser.parse_args(argv)
    try:
        if arguments.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {arguments.batch_size}")
        if arguments.scales is not None and min(arguments.scales) <= 0:
            raise ValueError(f"--scales must be positive, got {arguments.scales}")
        device = resolve_device(arguments.device)
        model, config = load_model(resolve_checkpoint(arguments.checkpoint), device)
        images = list_images(arguments.images)
        scales = tuple(arguments.scales) if arguments.scales else config.eval.seg_scales
        count = segment_folder(
            model,
            config,
            images,
            arguments.out,
            scales=scales,
            crf=arguments.crf,
            batch_size=arguments.batch_size,
            device=device,
        )
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    print(f"wrote {count} masks to {arguments.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
