"""The built-in synthetic dataset: shapes on clutter, the default when no data is given.

A segmentation task in VOC layout that needs no download and trains on a CPU. Each
image shows 1 to ``max_objects`` objects of 8 classes told apart only by shape (circle,
square, triangle, star, cross, crescent, heart, arrow); every instance gets its own
random colour and texture (stripes, checks, dots, smooth blobs or flat) with grain, a
random size, rotation, stretch and position, so neither colour nor texture says the
class. ``SyntheticConfig.class_set`` picks the shapes: "shapes" (the default, the 8
above) or "pretrain", 12 other shapes (pentagon, hexagon, ring, diamond, L, T, lens, bolt,
semicircle, trapezoid, bow tie, drop) that share none of the 8 and serve to pretrain a
backbone (``wsss_fast.models.pretrain_synthetic``) without seeing the target classes.
Backgrounds are two-colour textures under a smooth colour field with random
lines and arcs as clutter. Objects are painted in order, so later ones partly hide
earlier ones; every object keeps at least ``min_visible_fraction`` of its area visible
(occlusion and the image border both count), and its colours are drawn so that its mean
colour differs from the background under it by at least ``_MIN_OBJECT_CONTRAST`` (the
farthest of 16 candidates otherwise, which is rare), so each label can be seen.

Objects are rendered at 4x and area-averaged: edges are anti-aliased in the image and a
boundary pixel takes the class covering at least half of it in the mask. Masks hold 0
(background) and 1..K (the K classes of the class set); there are no ignore (255)
pixels, since no pixel is ambiguous beyond that half-coverage rule.

Every image draws from its own generator seeded by (seed, split, index): the output is
the same bytes for the same settings, and images do not depend on each other.

    python -m wsss_fast.data.synthetic --out DIR [--seed S] [--num-train N]
        [--num-val N] [--size PX] [--class-set {shapes,pretrain}]

``get_or_create_synthetic_dataset`` is what the trainer calls: it generates into a
cache folder named by a hash of the settings, once, and reuses it afterwards.
"""

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from wsss_fast.data.cache import cache_root
from wsss_fast.data.folder import CLASS_NAMES_FILE
from wsss_fast.data.palette import save_label_png

# Bump when the drawing changes: cached datasets of older versions are then regenerated.
GENERATOR_VERSION = 1

_SUPERSAMPLING = 4  # objects are drawn at 4x and area-averaged: anti-aliased edges
_POLYGON_SHIFT = 4  # cv2.fillPoly fractional bits: sub-pixel vertex positions
_MIN_OBJECT_CONTRAST = 90.0  # RGB distance between an object's and its background's mean
# Standard deviation (per RGB channel) of a texture's second colour around its first:
# how strongly patterns show, in backgrounds and on objects.
_BACKGROUND_COLOR_SPREAD = 35.0
_OBJECT_COLOR_SPREAD = 40.0
_CLUTTER_STROKES = (2, 5)  # fewest and most lines and arcs per background
_PLACEMENT_ATTEMPTS = 30
_SPLIT_CODES = {"train": 0, "val": 1}


@dataclass(frozen=True)
class SyntheticConfig:
    """Settings of the synthetic dataset; every field is part of the cache key.

    The default 64 px images suit a small ViT (patch 8: an 8x8 token grid) trained on
    2 CPU cores in minutes (methods.md's measurements used this size).
    """

    seed: int = 0
    num_train: int = 2000
    num_val: int = 300
    image_size: int = 64
    max_objects: int = 3
    object_radius_range: tuple[float, float] = (0.14, 0.3)  # fractions of the image side
    min_visible_fraction: float = 0.5
    jpeg_quality: int = 95
    class_set: str = "shapes"  # a key of CLASS_SETS

    def __post_init__(self):
        if self.num_train < 1 or self.num_val < 1:
            raise ValueError(
                f"num_train and num_val must be >= 1, got {self.num_train}, {self.num_val}"
            )
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels, got {self.image_size}")
        if self.max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {self.max_objects}")
        low, high = self.object_radius_range
        if not 0 < low <= high <= 0.35:
            raise ValueError(
                "object_radius_range must satisfy 0 < low <= high <= 0.35 (fractions of "
                f"the image side), got {self.object_radius_range}"
            )
        if not 0 < self.min_visible_fraction <= 1:
            raise ValueError(
                f"min_visible_fraction must be in (0, 1], got {self.min_visible_fraction}"
            )
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.class_set not in CLASS_SETS:
            raise ValueError(
                f"class_set must be one of {sorted(CLASS_SETS)}, got {self.class_set!r}"
            )

    @property
    def shape_names(self) -> tuple[str, ...]:
        """The foreground classes drawn, in label order (label 1 first)."""
        return CLASS_SETS[self.class_set]

    def settings(self) -> dict:
        """The fields and generator version, as hashed and written to synthetic.json.

        ``class_set`` is left out at its default: it came after version 1, and leaving it
        out keeps the default dataset's cache key and files byte-identical.
        """
        settings = {**dataclasses.asdict(self), "generator_version": GENERATOR_VERSION}
        if self.class_set == _DEFAULT_CLASS_SET:
            del settings["class_set"]
        return settings

    def cache_key(self) -> str:
        """A short hash of the settings and the generator version."""
        return hashlib.sha1(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()[:12]


# Shapes: lists of (polygon, fill) in unit coordinates (about radius 1, y down); a fill of
# 0 erases (the crescent's bite). Sizes are chosen so all shapes cover similar areas,
# which keeps size from hinting at the class.


def _regular_polygon(corners: int, radius: float, phase: float = 0.0) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(corners) / corners
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star() -> np.ndarray:
    radii = np.where(np.arange(10) % 2 == 0, 1.35, 0.55)
    angles = -np.pi / 2 + np.pi * np.arange(10) / 5
    return radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _arc(center: tuple[float, float], radius: float, start: float, stop: float) -> np.ndarray:
    """Points on a circular arc from angle ``start`` to ``stop`` (radians): (32, 2)."""
    angles = np.linspace(start, stop, 32)
    return np.array(center) + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _lens() -> np.ndarray:
    """Intersection of two discs of radius 1.6 whose centres lie 2.2 apart."""
    half_angle = math.acos(1.1 / 1.6)
    return 1.3 * np.concatenate(
        [
            _arc((-1.1, 0.0), 1.6, -half_angle, half_angle),
            _arc((1.1, 0.0), 1.6, np.pi - half_angle, np.pi + half_angle),
        ]
    )


def _drop() -> np.ndarray:
    """A disc with a pointed tip: tangents from the tip (0, -1.75) to a disc of radius 0.85."""
    radius, tip = 0.85, 1.75 + 0.4
    tangent = math.asin(radius / tip)
    return np.concatenate(
        [[(0.0, -1.75)], _arc((0.0, 0.4), radius, -np.pi / 2 + tangent, 3 * np.pi / 2 - tangent)]
    )


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2.5], axis=1) / 14.0


_ARM, _HALF_WIDTH = 1.15, 0.38
_SHAPES: dict[str, list[tuple[np.ndarray, int]]] = {
    "circle": [(_regular_polygon(64, 1.0), 1)],
    "square": [(_regular_polygon(4, 1.15, np.pi / 4), 1)],
    "triangle": [(_regular_polygon(3, 1.35, -np.pi / 2), 1)],
    "star": [(_star(), 1)],
    "cross": [
        (
            np.array(
                [
                    (-_HALF_WIDTH, -_ARM),
                    (_HALF_WIDTH, -_ARM),
                    (_HALF_WIDTH, -_HALF_WIDTH),
                    (_ARM, -_HALF_WIDTH),
                    (_ARM, _HALF_WIDTH),
                    (_HALF_WIDTH, _HALF_WIDTH),
                    (_HALF_WIDTH, _ARM),
                    (-_HALF_WIDTH, _ARM),
                    (-_HALF_WIDTH, _HALF_WIDTH),
                    (-_ARM, _HALF_WIDTH),
                    (-_ARM, -_HALF_WIDTH),
                    (-_HALF_WIDTH, -_HALF_WIDTH),
                ]
            ),
            1,
        )
    ],
    "crescent": [
        (_regular_polygon(64, 1.15), 1),
        (_regular_polygon(64, 0.95) + np.array([0.55, 0.0]), 0),
    ],
    "heart": [(_heart(), 1)],
    "arrow": [
        (
            np.array(
                [
                    (-1.2, -0.3),
                    (0.15, -0.3),
                    (0.15, -0.8),
                    (1.25, 0.0),
                    (0.15, 0.8),
                    (0.15, 0.3),
                    (-1.2, 0.3),
                ]
            ),
            1,
        )
    ],
}
# The pretraining shapes: none of them is (close to) one of the 8 above.
_SHAPES.update(
    {
        "pentagon": [(_regular_polygon(5, 1.2, -np.pi / 2), 1)],
        "hexagon": [(_regular_polygon(6, 1.1), 1)],
        "ring": [(_regular_polygon(64, 1.2), 1), (_regular_polygon(64, 0.65), 0)],
        "diamond": [(np.array([(0.0, -1.55), (0.95, 0.0), (0.0, 1.55), (-0.95, 0.0)]), 1)],
        "ell": [
            (
                np.array(
                    [(-1.0, -1.3), (-0.2, -1.3), (-0.2, 0.5), (1.0, 0.5), (1.0, 1.3), (-1.0, 1.3)]
                ),
                1,
            )
        ],
        "tee": [
            (
                np.array(
                    [
                        (-1.3, -1.2),
                        (1.3, -1.2),
                        (1.3, -0.45),
                        (0.38, -0.45),
                        (0.38, 1.3),
                        (-0.38, 1.3),
                        (-0.38, -0.45),
                        (-1.3, -0.45),
                    ]
                ),
                1,
            )
        ],
        "lens": [(_lens(), 1)],
        "bolt": [
            (
                1.4
                * np.array(
                    [
                        (0.35, -1.5),
                        (-0.75, 0.15),
                        (0.0, 0.15),
                        (-0.45, 1.5),
                        (0.8, -0.35),
                        (0.05, -0.35),
                    ]
                ),
                1,
            )
        ],
        "semicircle": [(_arc((0.0, 0.45), 1.4, np.pi, 2 * np.pi), 1)],
        "trapezoid": [(np.array([(-0.6, -0.8), (0.6, -0.8), (1.35, 0.8), (-1.35, 0.8)]), 1)],
        "bowtie": [
            (
                np.array(
                    [(-1.3, -1.0), (0.0, -0.15), (1.3, -1.0), (1.3, 1.0), (0.0, 0.15), (-1.3, 1.0)]
                ),
                1,
            )
        ],
        "drop": [(_drop(), 1)],
    }
)
SHAPE_CLASS_NAMES = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "crescent",
    "heart",
    "arrow",
)
PRETRAIN_SHAPE_NAMES = (
    "pentagon",
    "hexagon",
    "ring",
    "diamond",
    "ell",
    "tee",
    "lens",
    "bolt",
    "semicircle",
    "trapezoid",
    "bowtie",
    "drop",
)
# Foreground classes of each class set, in label order.
CLASS_SETS = {"shapes": SHAPE_CLASS_NAMES, "pretrain": PRETRAIN_SHAPE_NAMES}
_DEFAULT_CLASS_SET = "shapes"
CLASS_NAMES = ("background", *SHAPE_CLASS_NAMES)


def _draw_shape(
    shape: str, radius: float, angle: float, stretch: float, center: np.ndarray, size: int
) -> np.ndarray:
    """Coverage of a transformed shape: (size, size) float32 in [0, 1].

    ``radius`` and ``center`` (x, y) in pixels, ``angle`` in radians, ``stretch`` the
    x/y aspect (area kept).
    """
    cos, sin = math.cos(angle), math.sin(angle)
    linear = radius * np.array([[cos, -sin], [sin, cos]]) @ np.diag([stretch, 1 / stretch])
    canvas = np.zeros((size * _SUPERSAMPLING, size * _SUPERSAMPLING), dtype=np.uint8)
    fixed_point = _SUPERSAMPLING * (1 << _POLYGON_SHIFT)
    for polygon, fill in _SHAPES[shape]:
        # Pixel centres sit at half-integers in cv2's fixed-point coordinates.
        points = (polygon @ linear.T + center) * fixed_point - fixed_point / 2 / _SUPERSAMPLING
        cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], 255 * fill, shift=_POLYGON_SHIFT)
    coverage = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)
    return coverage.astype(np.float32) / 255.0


@functools.cache
def _unit_area(shape: str) -> float:
    """Area of the shape at radius 1 (measured once on a fine raster)."""
    size = 200
    coverage = _draw_shape(shape, 40.0, 0.0, 1.0, np.array([size / 2, size / 2]), size)
    return float(coverage.sum()) / 40.0**2


def _smooth_noise(rng: np.random.Generator, height: int, width: int, channels: int) -> np.ndarray:
    """Low-frequency noise: (height, width, channels) float32, about zero mean, unit scale."""
    cells = int(rng.integers(3, 7))
    coarse = rng.standard_normal((cells, cells, channels), dtype=np.float32)
    smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    return smooth.reshape(height, width, channels)


def _pattern(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random texture pattern: (height, width) float32 in [0, 1]."""
    x = np.arange(width, dtype=np.float32)[None, :]
    y = np.arange(height, dtype=np.float32)[:, None]
    angle = rng.uniform(0, np.pi)
    along = x * math.cos(angle) + y * math.sin(angle)
    across = -x * math.sin(angle) + y * math.cos(angle)
    period = rng.uniform(3.0, 9.0)
    phase = rng.uniform(0, 2 * np.pi)
    kind = rng.integers(5)
    if kind == 0:  # stripes
        return 0.5 + 0.5 * np.sin(2 * np.pi * along / period + phase)
    if kind == 1:  # checks
        return ((np.floor(along / period) + np.floor(across / period)) % 2).astype(np.float32)
    if kind == 2:  # dots
        waves = np.sin(2 * np.pi * along / period + phase) * np.sin(2 * np.pi * across / period)
        return (waves > 0.35).astype(np.float32)
    if kind == 3:  # smooth blobs
        noise = _smooth_noise(rng, height, width, 1)[..., 0]
        return np.clip(0.5 + 0.35 * noise, 0.0, 1.0)
    return np.zeros((height, width), dtype=np.float32)  # flat: only the grain remains


def _textured_fill(
    rng: np.random.Generator, height: int, width: int, color: np.ndarray, second_color: np.ndarray
) -> np.ndarray:
    """Two colours mixed by a random pattern, with grain: (height, width, 3) float32 RGB."""
    pattern = _pattern(rng, height, width)[..., None]
    grain = rng.standard_normal((height, width, 3), dtype=np.float32) * rng.uniform(2.0, 10.0)
    color = color.astype(np.float32)
    return color + (second_color.astype(np.float32) - color) * pattern + grain


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Textured, cluttered background: (size, size, 3) float32 RGB in [0, 255]."""
    first = rng.uniform(0, 255, 3)
    second = np.clip(first + rng.normal(0.0, _BACKGROUND_COLOR_SPREAD, 3), 0, 255)
    canvas = _textured_fill(rng, size, size, first, second)
    canvas += 35.0 * _smooth_noise(rng, size, size, 3)
    canvas = np.clip(canvas, 0, 255).astype(np.float32)
    # Clutter: thin lines and arcs, nothing shaped like a class.
    for _ in range(int(rng.integers(_CLUTTER_STROKES[0], _CLUTTER_STROKES[1] + 1))):
        color = tuple(float(value) for value in rng.uniform(0, 255, 3))
        thickness = int(rng.integers(1, 3))
        if rng.random() < 0.5:
            start, end = (tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(2))
            cv2.line(canvas, start, end, color, thickness, cv2.LINE_AA)
        else:
            center = tuple(int(v) for v in rng.integers(0, size, 2))
            axes = tuple(int(v) for v in rng.integers(size // 8, size // 2, 2))
            start_angle = float(rng.uniform(0, 360))
            sweep = float(rng.uniform(40, 150))
            cv2.ellipse(
                canvas,
                center,
                axes,
                float(rng.uniform(0, 180)),
                start_angle,
                start_angle + sweep,
                color,
                thickness,
                cv2.LINE_AA,
            )
    return canvas


def _object_colors(rng: np.random.Generator, background_mean: np.ndarray) -> np.ndarray:
    """Two colours of an object whose mean stands out from ``background_mean``: (2, 3)."""
    candidates = rng.uniform(0, 255, (16, 3))
    offsets = rng.normal(0.0, _OBJECT_COLOR_SPREAD, (16, 3))
    means = candidates + offsets / 2
    distances = np.linalg.norm(means - background_mean, axis=1)
    passing = np.flatnonzero(distances >= _MIN_OBJECT_CONTRAST)
    choice = passing[0] if passing.size else int(np.argmax(distances))
    return np.stack([candidates[choice], np.clip(candidates[choice] + offsets[choice], 0, 255)])


def render_synthetic_image(
    rng: np.random.Generator, config: SyntheticConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Draws one image and its mask.

    Returns ``image`` (S, S, 3) uint8 RGB and ``mask`` (S, S) uint8 with 0 background
    and 1..K the shape classes (``config.shape_names``; ``CLASS_NAMES`` by default).
    """
    size = config.image_size
    shape_names = config.shape_names
    canvas = _background(rng, size)
    # Which object owns each pixel (-1: background); class of each placed object.
    owner = np.full((size, size), -1, dtype=np.int8)
    object_classes: list[int] = []
    object_areas: list[float] = []
    target_count = int(rng.integers(1, config.max_objects + 1))
    low_radius, high_radius = (fraction * size for fraction in config.object_radius_range)
    for _ in range(target_count):
        for attempt in range(_PLACEMENT_ATTEMPTS):
            class_index = int(rng.integers(len(shape_names)))
            shape = shape_names[class_index]
            radius = rng.uniform(low_radius, high_radius)
            center = rng.uniform(0.1 * size, 0.9 * size, 2)
            if not object_classes and attempt == _PLACEMENT_ATTEMPTS - 1:
                center = np.array([size / 2, size / 2])  # the first object always fits here
            coverage = _draw_shape(
                shape,
                radius,
                rng.uniform(0, 2 * np.pi),
                math.exp(rng.uniform(math.log(0.8), math.log(1.25))),
                center,
                size,
            )
            covered = coverage >= 0.5
            area = _unit_area(shape) * radius**2
            if covered.sum() < config.min_visible_fraction * area:
                continue
            remaining = np.bincount(owner[~covered & (owner >= 0)], minlength=len(object_areas))
            if any(
                remaining[index] < config.min_visible_fraction * object_areas[index]
                for index in range(len(object_areas))
            ):
                continue
            # Texture and composite only inside the object's bounding box.
            rows = np.flatnonzero(coverage.any(axis=1))
            columns = np.flatnonzero(coverage.any(axis=0))
            box = (slice(rows[0], rows[-1] + 1), slice(columns[0], columns[-1] + 1))
            weights = coverage[box][..., None]
            region = canvas[box]
            background_mean = (weights.reshape(1, -1) @ region.reshape(-1, 3))[0] / weights.sum()
            color, second_color = _object_colors(rng, background_mean)
            fill = _textured_fill(rng, *region.shape[:2], color, second_color)
            canvas[box] = region * (1 - weights) + np.clip(fill, 0, 255) * weights
            owner[covered] = len(object_classes)
            object_classes.append(class_index + 1)
            object_areas.append(area)
            break
    grain = rng.standard_normal(canvas.shape, dtype=np.float32) * rng.uniform(2.0, 6.0)
    image = np.clip(canvas + grain, 0, 255).round().astype(np.uint8)
    class_lookup = np.array([0, *object_classes], dtype=np.uint8)
    mask = class_lookup[owner.astype(np.intp) + 1]
    return image, mask


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODES[split], index]))


def _write_dataset(folder: Path, config: SyntheticConfig, progress: bool) -> None:
    image_dir = folder / "JPEGImages"
    mask_dir = folder / "SegmentationClass"
    split_dir = folder / "ImageSets" / "Segmentation"
    for directory in (image_dir, mask_dir, split_dir):
        directory.mkdir(parents=True)
    class_names = ("background", *config.shape_names)
    (folder / CLASS_NAMES_FILE).write_text("\n".join(class_names) + "\n")
    (folder / "synthetic.json").write_text(json.dumps(config.settings(), indent=2) + "\n")
    # No chroma subsampling: at 64 px, 4:2:0 would smear colour across object edges.
    jpeg_options = [
        cv2.IMWRITE_JPEG_QUALITY,
        config.jpeg_quality,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
    ]
    for split, count in (("train", config.num_train), ("val", config.num_val)):
        names = [f"{split}_{index:05d}" for index in range(count)]
        for index in tqdm(range(count), desc=f"synthetic {split}", disable=not progress):
            image, mask = render_synthetic_image(_image_rng(config.seed, split, index), config)
            encoded_ok, encoded = cv2.imencode(".jpg", image[..., ::-1], jpeg_options)
            if not encoded_ok:
                raise RuntimeError(f"JPEG encoding of synthetic image {names[index]} failed")
            (image_dir / f"{names[index]}.jpg").write_bytes(encoded.tobytes())
            save_label_png(mask_dir / f"{names[index]}.png", mask)
        (split_dir / f"{split}.txt").write_text("\n".join(names) + "\n")


def generate_synthetic_dataset(
    out_dir: str | os.PathLike, config: SyntheticConfig | None = None, progress: bool = True
) -> Path:
    """Writes the dataset in VOC layout to ``out_dir`` and returns its path.

    Everything is written to a hidden folder beside ``out_dir`` and renamed at the end,
    so an interrupted run never leaves a folder that looks complete. ``out_dir`` must
    not exist or be empty; FileExistsError otherwise.
    """
    config = config or SyntheticConfig()
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"--out {out_dir} already exists and is not an empty folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        _write_dataset(partial, config, progress)
        # Renaming onto an empty folder works; onto a full one (another process won the
        # race) it fails, and the caller decides.
        os.rename(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out_dir


def get_or_create_synthetic_dataset(
    config: SyntheticConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """The root of the synthetic dataset for ``config``, generated on first use.

    It lives in ``<cache_dir>/synthetic-<hash of the settings>`` (``cache_dir``
    defaults to ``wsss_fast.data.cache.cache_root()``, i.e. ``$WSSS_FAST_CACHE`` or
    ``~/.cache/wsss_fast``). Only complete datasets are ever renamed into place, so an
    existing folder is complete; processes generating at once each finish and one wins.
    """
    config = config or SyntheticConfig()
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / f"synthetic-{config.cache_key()}"
    if target.is_dir() and any(target.iterdir()):
        return target
    try:
        return generate_synthetic_dataset(target, config, progress)
    except OSError:
        if target.is_dir() and any(target.iterdir()):
            return target  # another process finished the same dataset first
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m wsss_fast.data.synthetic",
        description="Write the synthetic shapes dataset in VOC layout.",
    )
    defaults = SyntheticConfig()
    parser.add_argument("--out", required=True, type=Path, help="folder to create")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--num-train", type=int, default=defaults.num_train)
    parser.add_argument("--num-val", type=int, default=defaults.num_val)
    parser.add_argument(
        "--size", type=int, default=defaults.image_size, help="image side in pixels"
    )
    parser.add_argument(
        "--class-set",
        choices=sorted(CLASS_SETS),
        default=defaults.class_set,
        help="shapes: the 8 classes of the dataset; pretrain: 12 other shapes",
    )
    arguments = parser.parse_args(argv)
    try:
        config = SyntheticConfig(
            seed=arguments.seed,
            num_train=arguments.num_train,
            num_val=arguments.num_val,
            image_size=arguments.size,
            class_set=arguments.class_set,
        )
        started = time.perf_counter()
        out_dir = generate_synthetic_dataset(arguments.out, config)
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    elapsed = time.perf_counter() - started
    print(
        f"wrote {config.num_train} train + {config.num_val} val images of "
        f"{config.image_size} px to {out_dir} in {elapsed:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
