"""Dataset readers on small VOC and COCO fixtures made here, and every error of the quick scan."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from wsss_fast.data import COCOSegmentation, SegmentationFolder, VOCSegmentation, save_label_png

HEIGHT, WIDTH = 8, 10


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Each test gets its own label cache."""
    monkeypatch.setenv("WSSS_FAST_CACHE", str(tmp_path / "cache"))


def _write_image(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _mask_with(classes, ignore_border=True):
    """A (HEIGHT, WIDTH) mask holding background and the given classes in vertical bands."""
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    for band, label in enumerate(classes):
        mask[:, 2 * band + 1 : 2 * band + 3] = label
    if ignore_border:
        mask[0, :] = 255
    return mask


def _write_mask(path, mask):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_label_png(path, mask)


def _write_split(path, names):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(names) + "\n")


VOC_MASKS = {
    "2007_000001": [1, 15],
    "2007_000002": [20],
    "2007_000003": [],
    "2008_000004": [7, 8, 9],
}


def make_voc(root):
    """A VOCdevkit/VOC2012 with train (2), val (2), train_aug (4) and test (1) splits."""
    voc = root / "VOCdevkit" / "VOC2012"
    for seed, (name, classes) in enumerate(VOC_MASKS.items()):
        _write_image(voc / "JPEGImages" / f"{name}.jpg", seed)
        _write_mask(voc / "SegmentationClass" / f"{name}.png", _mask_with(classes))
        # The augmented masks have no boundary band, as SBD's.
        _write_mask(voc / "SegmentationClassAug" / f"{name}.png", _mask_with(classes, False))
    _write_image(voc / "JPEGImages" / "2009_000005.jpg", 99)
    names = list(VOC_MASKS)
    _write_split(voc / "ImageSets" / "Segmentation" / "train.txt", names[:2])
    _write_split(voc / "ImageSets" / "Segmentation" / "val.txt", names[2:])
    _write_split(voc / "ImageSets" / "SegmentationAug" / "train_aug.txt", names)
    _write_split(voc / "ImageSets" / "Segmentation" / "test.txt", ["2009_000005"])
    return voc


def _expected_labels(names, num_foreground):
    labels = np.zeros((len(names), num_foreground), dtype=np.float32)
    for row, name in enumerate(names):
        for label in VOC_MASKS[name]:
            labels[row, label - 1] = 1
    return labels


def test_voc_samples_carry_image_mask_label_and_name(tmp_path):
    voc = make_voc(tmp_path)
    dataset = VOCSegmentation(voc, "train")
    assert len(dataset) == 2 and dataset.num_classes == 21
    assert dataset.num_foreground_classes == 20
    sample = dataset[0]
    assert sample["name"] == "2007_000001"
    assert sample["image"].shape == (3, HEIGHT, WIDTH) and sample["image"].dtype == torch.uint8
    assert sample["mask"].shape == (HEIGHT, WIDTH) and sample["mask"].dtype == torch.int64
    assert torch.equal(sample["mask"], torch.from_numpy(_mask_with([1, 15]).astype(np.int64)))
    assert sample["label"].dtype == torch.float32 and sample["label"].shape == (20,)
    assert torch.nonzero(sample["label"]).flatten().tolist() == [0, 14]  # classes 1 and 15
    np.testing.assert_array_equal(dataset.image_labels, _expected_labels(dataset.names, 20))


def test_voc_train_aug_reads_augmented_masks_and_accepts_the_devkit_folder(tmp_path):
    make_voc(tmp_path)
    dataset = VOCSegmentation(tmp_path / "VOCdevkit", "train_aug")
    assert dataset.names == list(VOC_MASKS)
    assert dataset.mask_dir.name == "SegmentationClassAug"
    assert (dataset[0]["mask"] != 255).all()  # no boundary band in the augmented masks
    np.testing.assert_array_equal(dataset.image_labels, _expected_labels(dataset.names, 20))


def test_voc_test_split_has_images_only(tmp_path):
    dataset = VOCSegmentation(make_voc(tmp_path), "test")
    sample = dataset[0]
    assert not dataset.has_masks and dataset.image_labels is None
    assert set(sample) == {"image", "name"}


def test_image_labels_are_cached_and_rescanned_when_the_split_changes(tmp_path, monkeypatch):
    voc = make_voc(tmp_path)
    VOCSegmentation(voc, "val")
    cache_files = list((tmp_path / "cache" / "image_labels").glob("*.json"))
    assert len(cache_files) == 1
    assert json.loads(cache_files[0].read_text())["present_classes"] == [[], [7, 8, 9]]

    def fail_scan(self):
        raise AssertionError("labels were derived again although the cache is valid")

    with monkeypatch.context() as patch:
        patch.setattr(SegmentationFolder, "_derive_labels", fail_scan)
        cached = VOCSegmentation(voc, "val")
    assert cached.image_labels[1, 6:9].tolist() == [1, 1, 1]

    _write_split(voc / "ImageSets" / "Segmentation" / "val.txt", ["2007_000001"])
    changed = VOCSegmentation(voc, "val")
    assert changed.names == ["2007_000001"]
    assert torch.nonzero(torch.from_numpy(changed.image_labels[0])).flatten().tolist() == [0, 14]


def test_image_labels_are_rescanned_when_a_mask_changes(tmp_path):
    voc = make_voc(tmp_path)
    assert VOCSegmentation(voc, "train").image_labels[1].nonzero()[0].tolist() == [19]
    mask_path = voc / "SegmentationClass" / "2007_000002.png"
    _write_mask(mask_path, _mask_with([3, 4, 5]))
    assert VOCSegmentation(voc, "train").image_labels[1].nonzero()[0].tolist() == [2, 3, 4]


def make_coco(root):
    names = {"train": ["COCO_train2014_000000000009"], "val": ["COCO_val2014_000000000042"]}
    for seed, (split, split_names) in enumerate(names.items()):
        for name in split_names:
            _write_image(root / "JPEGImages" / f"{split}2014" / f"{name}.jpg", seed)
            _write_mask(
                root / "SegmentationClass" / f"{split}2014" / f"{name}.png",
                _mask_with([1, 80] if split == "train" else [45]),
            )
        _write_split(root / "ImageSets" / f"{split}.txt", split_names)
    return root


def test_coco_reads_per_image_class_index_masks(tmp_path):
    root = make_coco(tmp_path / "coco")
    train = COCOSegmentation(root, "train")
    assert train.num_classes == 81 and train.class_names[80] == "toothbrush"
    sample = train[0]
    assert sample["name"] == "COCO_train2014_000000000009"
    assert torch.nonzero(sample["label"]).flatten().tolist() == [0, 79]
    val = COCOSegmentation(root, "val")
    assert val.image_dir.name == "val2014"
    assert torch.nonzero(val[0]["label"]).flatten().tolist() == [44]


def test_coco_split_must_name_train_or_val(tmp_path):
    with pytest.raises(ValueError, match="start with 'train' or 'val'"):
        COCOSegmentation(make_coco(tmp_path / "coco"), "test")


def make_folder(root, class_names=("background", "cat", "dog")):
    for seed, name in enumerate(["a", "b"]):
        _write_image(root / "JPEGImages" / f"{name}.jpg", seed)
        _write_mask(root / "SegmentationClass" / f"{name}.png", _mask_with([seed + 1]))
    _write_split(root / "ImageSets" / "Segmentation" / "train.txt", ["a", "b"])
    (root / "class_names.txt").write_text("\n".join(class_names) + "\n")
    return root


def test_any_voc_layout_folder_with_a_class_names_file(tmp_path):
    dataset = SegmentationFolder(make_folder(tmp_path / "mine"), "train")
    assert dataset.class_names == ("background", "cat", "dog")
    assert dataset.image_labels.tolist() == [[1, 0], [0, 1]]
    assert dataset[1]["label"].tolist() == [0.0, 1.0]


def test_transform_output_is_extended_with_label_and_name(tmp_path):
    def transform(image, mask):
        return {"image": torch.zeros(3, 4, 4), "mask": torch.zeros(4, 4, dtype=torch.int64)}

    dataset = SegmentationFolder(make_folder(tmp_path / "mine"), "train", transform=transform)
    assert set(dataset[0]) == {"image", "mask", "label", "name"}


# The quick scan: every problem raises before training, naming the file.


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        VOCSegmentation(tmp_path / "nowhere", "train")
    with pytest.raises(FileNotFoundError, match="dataset root"):
        SegmentationFolder(tmp_path / "nowhere", "train")


def test_missing_split_file_lists_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"trainval\.txt"):
        VOCSegmentation(make_voc(tmp_path), "trainval")


def test_split_naming_an_absent_image(tmp_path):
    voc = make_voc(tmp_path)
    _write_split(voc / "ImageSets" / "Segmentation" / "train.txt", ["2007_000001", "ghost"])
    with pytest.raises(FileNotFoundError, match=r"ghost\.jpg"):
        VOCSegmentation(voc, "train")


def test_missing_mask(tmp_path):
    voc = make_voc(tmp_path)
    (voc / "SegmentationClass" / "2007_000002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"mask.*2007_000002\.png"):
        VOCSegmentation(voc, "train")


def test_unreadable_image(tmp_path):
    voc = make_voc(tmp_path)
    (voc / "JPEGImages" / "2007_000002.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"image .*2007_000002\.jpg cannot be read"):
        VOCSegmentation(voc, "train")


def test_unreadable_mask(tmp_path):
    voc = make_voc(tmp_path)
    (voc / "SegmentationClass" / "2007_000001.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=r"2007_000001\.png cannot be read"):
        VOCSegmentation(voc, "train")


def test_mask_label_outside_the_class_range(tmp_path):
    voc = make_voc(tmp_path)
    _write_mask(voc / "SegmentationClass" / "2007_000002.png", _mask_with([3, 21, 200]))
    with pytest.raises(ValueError, match=r"2007_000002\.png holds label\(s\) 21, 200 outside"):
        VOCSegmentation(voc, "train")


def test_mask_of_another_size_than_its_image(tmp_path):
    voc = make_voc(tmp_path)
    _write_mask(voc / "SegmentationClass" / "2007_000001.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(ValueError, match=r"2007_000001\.png is 5x5 but its image"):
        VOCSegmentation(voc, "train")


def test_rgb_mask_is_rejected(tmp_path):
    voc = make_voc(tmp_path)
    rgb = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    Image.fromarray(rgb).save(voc / "SegmentationClass" / "2007_000001.png")
    with pytest.raises(ValueError, match=r"2007_000001\.png is a 'RGB' image"):
        VOCSegmentation(voc, "train")


def test_class_names_file_missing_or_too_short(tmp_path):
    root = make_folder(tmp_path / "mine")
    (root / "class_names.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"class_names\.txt"):
        SegmentationFolder(root, "train")
    (root / "class_names.txt").write_text("background\n")
    with pytest.raises(ValueError, match="at least one class"):
        SegmentationFolder(root, "train")


def test_empty_split_file(tmp_path):
    root = make_folder(tmp_path / "mine")
    _write_split(root / "ImageSets" / "Segmentation" / "train.txt", [])
    with pytest.raises(ValueError, match="names no images"):
        SegmentationFolder(root, "train")
