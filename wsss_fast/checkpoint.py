"""Checkpoints written atomically: a crash mid-write never leaves a broken file."""

import os
import uuid
from pathlib import Path
from typing import Any

import torch


def atomic_torch_save(state: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` into a temporary file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint written by the trainer. ``path`` is the file or a run directory
    (then its ``checkpoints/latest.pt``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "latest.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    # Our own files: optimizer and config entries are plain containers, but numpy
    # scalars may appear in metrics, hence weights_only=False for trusted local files.
    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ValueError(f"{path} is not a wsss_fast training checkpoint")
    return checkpoint
