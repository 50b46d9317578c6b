"""The synthetic shapes dataset: determinism, layout, labels, cache, command line."""

import json

import numpy as np
import pytest

from wsss_fast.data import SegmentationFolder, read_label_png, synthetic
from wsss_fast.data.synthetic import (
    CLASS_NAMES,
    SyntheticConfig,
    generate_synthetic_dataset,
    get_or_create_synthetic_dataset,
    render_synthetic_image,
)

TINY = SyntheticConfig(seed=3, num_train=6, num_val=3, image_size=32)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WSSS_FAST_CACHE", str(tmp_path / "cache"))


def _all_files(root):
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_same_settings_give_the_same_bytes_and_another_seed_other_images(tmp_path):
    first = _all_files(generate_synthetic_dataset(tmp_path / "a", TINY, progress=False))
    second = _all_files(generate_synthetic_dataset(tmp_path / "b", TINY, progress=False))
    assert first == second
    other_seed = SyntheticConfig(seed=4, num_train=6, num_val=3, image_size=32)
    third = _all_files(generate_synthetic_dataset(tmp_path / "c", other_seed, progress=False))
    assert third.keys() == first.keys()
    assert third["JPEGImages/train_00000.jpg"] != first["JPEGImages/train_00000.jpg"]


def test_voc_layout_that_the_folder_reader_accepts(tmp_path):
    root = generate_synthetic_dataset(tmp_path / "shapes", TINY, progress=False)
    assert (root / "class_names.txt").read_text().split() == list(CLASS_NAMES)
    assert json.loads((root / "synthetic.json").read_text())["image_size"] == 32
    train = SegmentationFolder(root, "train")
    val = SegmentationFolder(root, "val")
    assert len(train) == 6 and len(val) == 3
    assert train.num_classes == 9 and train.class_names[1:] == synthetic.SHAPE_CLASS_NAMES
    sample = train[0]
    assert sample["image"].shape == (3, 32, 32) and sample["mask"].shape == (32, 32)
    assert not list(tmp_path.glob(".*partial*"))  # the temporary folder was renamed


def test_labels_match_masks_and_every_image_holds_one_to_three_objects(tmp_path):
    root = generate_synthetic_dataset(tmp_path / "shapes", TINY, progress=False)
    dataset = SegmentationFolder(root, "train")
    for row, name in enumerate(dataset.names):
        mask = read_label_png(root / "SegmentationClass" / f"{name}.png")
        values = set(np.unique(mask).tolist())
        assert values <= set(range(9))  # background and 8 classes, no ignore label
        foreground = sorted(values - {0})
        assert 1 <= len(foreground) <= 3
        assert (np.flatnonzero(dataset.image_labels[row]) + 1).tolist() == foreground


def test_objects_keep_their_visible_share_and_stand_out_from_the_background():
    config = SyntheticConfig(image_size=48)
    for index in range(20):
        image, mask = render_synthetic_image(np.random.default_rng(index), config)
        assert image.shape == (48, 48, 3) and image.dtype == np.uint8
        for label in set(np.unique(mask).tolist()) - {0}:
            # A visible object covers at least half of the smallest possible shape area.
            smallest = 0.5 * min(map(synthetic._unit_area, synthetic.SHAPE_CLASS_NAMES))
            assert (mask == label).sum() >= smallest * (0.14 * 48) ** 2


def test_classes_are_told_apart_by_shape_not_colour():
    config = SyntheticConfig(image_size=48)
    mean_colors = {label: [] for label in range(1, 9)}
    for index in range(150):
        image, mask = render_synthetic_image(np.random.default_rng(1000 + index), config)
        for label in set(np.unique(mask).tolist()) - {0}:
            mean_colors[label].append(image[mask == label].mean(axis=0))
    for label, colors in mean_colors.items():
        assert len(colors) >= 10, f"class {label} drawn only {len(colors)} times"
        # Instances of one class spread over the colour cube (uniform: std ~74 per channel).
        assert np.std(colors, axis=0).min() > 40, f"class {label} has a colour of its own"


def test_the_trainer_gets_a_cached_dataset_generated_once(tmp_path, monkeypatch):
    root = get_or_create_synthetic_dataset(TINY, progress=False)
    assert root.parent == tmp_path / "cache" and root.name == f"synthetic-{TINY.cache_key()}"

    def fail(*args, **kwargs):
        raise AssertionError("the cached dataset was generated again")

    monkeypatch.setattr(synthetic, "generate_synthetic_dataset", fail)
    assert get_or_create_synthetic_dataset(TINY, progress=False) == root
    other = SyntheticConfig(seed=4, num_train=6, num_val=3, image_size=32)
    assert other.cache_key() != TINY.cache_key()


def test_an_interrupted_generation_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    calls = []

    def render_then_stop(rng, config):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return render_synthetic_image(rng, config)

    monkeypatch.setattr(synthetic, "render_synthetic_image", render_then_stop)
    with pytest.raises(KeyboardInterrupt):
        get_or_create_synthetic_dataset(TINY, progress=False)
    cache = tmp_path / "cache"
    assert list(cache.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setenv("WSSS_FAST_CACHE", str(cache))
    root = get_or_create_synthetic_dataset(TINY, progress=False)
    assert len(SegmentationFolder(root, "train")) == 6


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    arguments = ["--out", str(out), "--seed", "1", "--num-train", "2", "--num-val", "1"]
    assert synthetic.main([*arguments, "--size", "24"]) == 0
    assert "wrote 2 train + 1 val images of 24 px" in capsys.readouterr().out
    assert (out / "ImageSets" / "Segmentation" / "val.txt").read_text().split() == ["val_00000"]
    assert read_label_png(out / "SegmentationClass" / "train_00001.png").shape == (24, 24)
    with pytest.raises(SystemExit):
        synthetic.main(arguments)  # the folder exists and is not empty
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        synthetic.main(["--out", str(tmp_path / "x"), "--num-train", "0"])
    assert "num_train" in capsys.readouterr().err
