"""The evaluate command on tiny folders of label maps."""

import json

import numpy as np
import pytest

from wsss_fast.data import save_label_png
from wsss_fast.evaluate import evaluate_folders, main

# Two 2x3 maps; over both, pairs (ground truth, prediction) give the confusion matrix
# [[5, 1, 0], [0, 2, 0], [0, 1, 2]] (one ignored pixel): IoU 5/6, 2/4, 2/3.
PREDICTIONS = {
    "a": np.array([[0, 0, 1], [1, 1, 2]], np.uint8),
    "b": np.array([[1, 2, 0], [0, 0, 0]], np.uint8),
}
GROUND_TRUTHS = {
    "a": np.array([[0, 0, 0], [1, 1, 2]], np.uint8),
    "b": np.array([[2, 2, 255], [0, 0, 0]], np.uint8),
}
EXPECTED_IOU = [100 * 5 / 6, 100 * 2 / 4, 100 * 2 / 3]


def _write_folders(root, predictions=PREDICTIONS, ground_truths=GROUND_TRUTHS):
    for folder, maps in (("pred", predictions), ("gt", ground_truths)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name, labels in maps.items():
            save_label_png(root / folder / f"{name}.png", labels)
    return root / "pred", root / "gt"


def test_prints_per_class_iou_and_miou_and_writes_json(tmp_path, capsys):
    pred, gt = _write_folders(tmp_path)
    report = tmp_path / "scores.json"
    arguments = ["--pred", str(pred), "--gt", str(gt), "--num-classes", "3"]
    assert main([*arguments, "--json", str(report)]) == 0
    output = capsys.readouterr().out
    expected_mean = sum(EXPECTED_IOU) / 3
    assert f"mIoU: {expected_mean:.2f}" in output.splitlines()
    assert f"{EXPECTED_IOU[1]:6.2f}" in output
    scores = json.loads(report.read_text())
    assert scores["miou"] == pytest.approx(expected_mean, abs=1e-3)
    assert list(scores["per_class_iou"].values()) == pytest.approx(EXPECTED_IOU, abs=1e-3)
    assert scores["num_images"] == 2


def test_class_names_label_the_table(tmp_path, capsys):
    pred, gt = _write_folders(tmp_path)
    names = tmp_path / "names.txt"
    names.write_text("background\ncat\ndog\n")
    arguments = ["--pred", str(pred), "--gt", str(gt), "--num-classes", "3"]
    assert main([*arguments, "--class-names", str(names)]) == 0
    assert any(line.split()[:2] == ["2", "dog"] for line in capsys.readouterr().out.splitlines())


def test_folders_that_do_not_match_name_the_files(tmp_path, capsys):
    pred, gt = _write_folders(tmp_path)
    save_label_png(pred / "stray.png", np.zeros((2, 3), np.uint8))
    (gt / "b.png").unlink()
    arguments = ["--pred", str(pred), "--gt", str(gt), "--num-classes", "3"]
    assert main(arguments) == 1
    error = capsys.readouterr().err
    assert "do not match" in error and "b.png, stray.png" in error and str(gt) in error


def test_names_file_scores_only_the_listed_images(tmp_path):
    pred, gt = _write_folders(tmp_path)
    save_label_png(gt / "train_only.png", np.zeros((2, 3), np.uint8))
    scores, count = evaluate_folders(pred, gt, 3, names=["a"], progress=False)
    assert count == 1
    assert scores.per_class_iou == pytest.approx([2 / 3, 2 / 3, 1.0])


def test_size_mismatch_and_out_of_range_labels_name_the_files(tmp_path):
    pred, gt = _write_folders(tmp_path)
    save_label_png(pred / "a.png", np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError, match=r"pred/a\.png is 3x3 but .*gt/a\.png is 3x2"):
        evaluate_folders(pred, gt, 3, progress=False)
    pred, gt = _write_folders(tmp_path / "again")
    save_label_png(gt / "b.png", np.full((2, 3), 7, np.uint8))
    with pytest.raises(ValueError, match=r"gt/b\.png: target holds class indices \[7\]"):
        evaluate_folders(pred, gt, 3, progress=False)


def test_missing_folder(tmp_path, capsys):
    arguments = ["--pred", str(tmp_path / "none"), "--gt", str(tmp_path), "--num-classes", "3"]
    assert main(arguments) == 1
    assert "--pred" in capsys.readouterr().err
