"""Segmentation datasets in VOC layout: the reader every dataset of wsss_fast builds on.

Layout under ``root`` (each part can be renamed through the constructor):

    JPEGImages/<name>.jpg                   images
    SegmentationClass/<name>.png            masks: class indices, 0 background, 255 ignore
    ImageSets/Segmentation/<split>.txt      one image name per line
    class_names.txt                         one class name per line, background first

The constructor checks the whole split before any training starts: a missing root,
split file, image or mask, an unreadable file, a mask whose size differs from its
image's or whose labels fall outside the class range all raise an error naming the
file. Image-level labels (which foreground classes a mask holds) are derived from the
masks on that first scan and cached; the cache is keyed by the split file's bytes and
the size and modification time of every image and mask, so any change re-scans.
"""

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from wsss_fast.data.cache import atomic_write_text, cache_root
from wsss_fast.data.palette import IGNORE_INDEX, read_label_png
from wsss_fast.data.transforms import to_tensors

CLASS_NAMES_FILE = "class_names.txt"
_LABEL_CACHE_FORMAT = 1
_MAX_LISTED_PROBLEMS = 10

Transform = Callable[[np.ndarray, np.ndarray | None], dict[str, torch.Tensor]]


def read_class_names(path: str | os.PathLike) -> tuple[str, ...]:
    """Reads a class-names file: one name per line, the background class (label 0) first."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-names file {path} does not exist")
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if len(names) < 2:
        raise ValueError(
            f"class-names file {path} must name the background and at least one class, "
            f"got {len(names)} name(s)"
        )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"class-names file {path} repeats {', '.join(duplicates)}")
    return names


def read_split_file(path: str | os.PathLike) -> list[str]:
    """Reads the image names of a split file, one per line.

    Lines of DeepLab-style lists (``/JPEGImages/x.jpg /SegmentationClassAug/x.png``)
    give the stem of their first path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    names = []
    for line in path.read_text().splitlines():
        fields = line.split()
        if not fields:
            continue
        names.append(Path(fields[0]).stem if "/" in fields[0] else fields[0])
    if not names:
        raise ValueError(f"split file {path} names no images")
    return names


def first_existing_file(candidates: Sequence[Path], what: str) -> Path:
    """The first of ``candidates`` that exists; FileNotFoundError listing them all if none."""
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    listed = ", ".join(str(candidate) for candidate in candidates)
    raise FileNotFoundError(f"no {what} found; looked for {listed}")


def read_rgb_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an image as (H, W, 3) uint8 RGB (grey and RGBA images are converted)."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    except OSError as error:
        raise ValueError(f"image {path} cannot be read: {error}") from error


def _listed_problems(problems: list[str]) -> str:
    shown = "\n  ".join(problems[:_MAX_LISTED_PROBLEMS])
    more = len(problems) - _MAX_LISTED_PROBLEMS
    return f"\n  {shown}" + (f"\n  ... and {more} more" if more > 0 else "")


class SegmentationFolder(Dataset):
    """A split of a segmentation dataset in VOC layout (see the module docstring).

    A sample is a dict: what ``transform(image, mask)`` returns (``image`` (3, H, W)
    and ``mask`` (H, W) int64 tensors, plus the transform's extras such as
    ``valid_box``; without a transform the image stays uint8), with
    ``label`` (C,) float32, the multi-hot image-level label over the C foreground
    classes (background excluded), and ``name`` (str). Splits without masks
    (``mask_dir=None``, e.g. VOC's test split) give neither ``mask`` nor ``label``.

    Args:
        root: dataset folder.
        split: split name; the split file defaults to ``ImageSets/Segmentation/<split>.txt``.
        transform: callable ``(image (H, W, 3) uint8, mask (H, W) uint8 or None) -> dict``.
        class_names: the class names, background first; None reads ``class_names.txt``.
        image_dir, mask_dir: folders under ``root``; ``mask_dir=None`` for image-only splits.
        split_file: path of the split file, overriding the default.
        image_suffix, mask_suffix: file name endings of images and masks.
        ignore_index: the mask value that marks ignored pixels.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        transform: Transform | None = None,
        class_names: Sequence[str] | None = None,
        image_dir: str = "JPEGImages",
        mask_dir: str | None = "SegmentationClass",
        split_file: str | os.PathLike | None = None,
        image_suffix: str = ".jpg",
        mask_suffix: str = ".png",
        ignore_index: int = IGNORE_INDEX,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root {self.root} does not exist or is no folder")
        self.split = split
        self.transform = transform
        self.ignore_index = ignore_index
        if class_names is None:
            class_names = read_class_names(self.root / CLASS_NAMES_FILE)
        self.class_names = tuple(class_names)
        if len(self.class_names) < 2:
            raise ValueError("class_names must hold the background and at least one class")
        if not 0 <= ignore_index <= 255 or ignore_index < len(self.class_names):
            raise ValueError(
                f"ignore_index must be in [{len(self.class_names)}, 255] (a value no class "
                f"uses that a uint8 mask can hold), got {ignore_index}"
            )
        self.image_dir = self.root / image_dir
        self.mask_dir = None if mask_dir is None else self.root / mask_dir
        self.split_file = Path(
            split_file
            if split_file is not None
            else self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        )
        self.names = read_split_file(self.split_file)
        self.image_paths = [self.image_dir / f"{name}{image_suffix}" for name in self.names]
        self.mask_paths = (
            None
            if self.mask_dir is None
            else [self.mask_dir / f"{name}{mask_suffix}" for name in self.names]
        )
        self.image_labels = self._scan()

    @property
    def num_classes(self) -> int:
        """Number of segmentation classes, background included (C + 1)."""
        return len(self.class_names)

    @property
    def num_foreground_classes(self) -> int:
        """Number of foreground classes C: the length of the image-level label vector."""
        return len(self.class_names) - 1

    @property
    def has_masks(self) -> bool:
        return self.mask_paths is not None

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        image = read_rgb_image(self.image_paths[index])
        mask = None if self.mask_paths is None else read_label_png(self.mask_paths[index])
        transform = self.transform or to_tensors
        sample = transform(image, mask)
        if self.image_labels is not None:
            sample["label"] = torch.from_numpy(self.image_labels[index].astype(np.float32))
        sample["name"] = self.names[index]
        return sample

    # The quick scan before training.

    def _scan(self) -> np.ndarray | None:
        """Checks that every listed file exists; derives (or loads) the image labels.

        Returns (N, C) uint8 multi-hot labels, None for splits without masks.
        """
        self._check_listed_files_exist(self.image_dir, self.image_paths, "image")
        if self.mask_paths is None:
            return None
        self._check_listed_files_exist(self.mask_dir, self.mask_paths, "mask")
        cache_key = self._label_cache_key()
        cache_path = self._label_cache_path()
        present_classes = self._load_cached_labels(cache_path, cache_key)
        if present_classes is None:
            present_classes = self._derive_labels()
            payload = {
                "format": _LABEL_CACHE_FORMAT,
                "key": cache_key,
                "split_file": str(self.split_file.resolve()),
                "present_classes": present_classes,
            }
            atomic_write_text(cache_path, json.dumps(payload))
        labels = np.zeros((len(self.names), self.num_foreground_classes), dtype=np.uint8)
        for row, classes in enumerate(present_classes):
            labels[row, np.asarray(classes, dtype=np.intp) - 1] = 1
        return labels

    def _check_listed_files_exist(self, folder: Path, paths: list[Path], kind: str) -> None:
        if not folder.is_dir():
            raise FileNotFoundError(f"{kind} folder {folder} does not exist")
        # One directory listing instead of a stat per file: fast on network file systems.
        present = set(os.listdir(folder))
        missing = [str(path) for path in paths if path.name not in present]
        if missing:
            raise FileNotFoundError(
                f"split file {self.split_file} names {len(missing)} {kind}(s) that do not "
                f"exist:{_listed_problems(missing)}"
            )

    def _label_cache_key(self) -> str:
        digest = hashlib.sha1()
        digest.update(self.split_file.read_bytes())
        digest.update(f"classes={self.num_classes};ignore={self.ignore_index}".encode())
        for image_path, mask_path in zip(self.image_paths, self.mask_paths, strict=True):
            for path in (image_path, mask_path):
                status = path.stat()
                digest.update(f"{path.name}:{status.st_size}:{status.st_mtime_ns};".encode())
        return digest.hexdigest()

    def _label_cache_path(self) -> Path:
        location = f"{self.split_file.resolve()}|{self.mask_dir.resolve()}"
        location_hash = hashlib.sha1(location.encode()).hexdigest()[:16]
        readable = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{self.root.resolve().name}-{self.split}")
        return cache_root() / "image_labels" / f"{readable}-{location_hash}.json"

    def _load_cached_labels(self, cache_path: Path, cache_key: str) -> list[list[int]] | None:
        try:
            payload = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            return None
        if payload.get("format") != _LABEL_CACHE_FORMAT or payload.get("key") != cache_key:
            return None
        return payload["present_classes"]

    def _derive_labels(self) -> list[list[int]]:
        """Reads every mask (and every image header) once: the labels and the checks."""
        problems: list[str] = []
        present_classes: list[list[int]] = []
        # Decoding PNGs releases the GIL: a few threads make the first scan faster.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            results = pool.map(self._inspect_pair, self.image_paths, self.mask_paths)
            progress = tqdm(
                results,
                total=len(self.names),
                desc=f"scanning {self.root.name}/{self.split}",
                unit="image",
                leave=False,
            )
            for classes, problem in progress:
                present_classes.append(classes)
                if problem is not None:
                    problems.append(problem)
        if problems:
            raise ValueError(
                f"split {self.split_file} has {len(problems)} unusable image/mask "
                f"pair(s):{_listed_problems(problems)}"
            )
        return present_classes

    def _inspect_pair(self, image_path: Path, mask_path: Path) -> tuple[list[int], str | None]:
        """The foreground classes of one mask, or a problem naming the file."""
        try:
            # Opening reads only the header: enough to catch non-image files and sizes.
            with Image.open(image_path) as image:
                width, height = image.size
        except OSError as error:
            return [], f"image {image_path} cannot be read: {error}"
        try:
            mask = read_label_png(mask_path)
        except (OSError, ValueError) as error:
            return [], str(error)
        if mask.shape != (height, width):
            return [], (
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{image_path} is {width}x{height}"
            )
        counts = np.bincount(mask.ravel(), minlength=256)
        values = np.flatnonzero(counts)
        out_of_range = values[(values >= self.num_classes) & (values != self.ignore_index)]
        if out_of_range.size:
            return [], (
                f"mask {mask_path} holds label(s) {', '.join(map(str, out_of_range.tolist()))} "
                f"outside [0, {self.num_classes - 1}] (ignore label {self.ignore_index})"
            )
        classes = values[(values > 0) & (values < self.num_classes)]
        return classes.tolist(), None
