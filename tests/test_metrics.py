"""Confusion-matrix mIoU against hand-computed numbers, and its merge across processes."""

import math
import multiprocessing

import pytest
import torch

from wsss_fast.metrics import SegmentationMetric, SegmentationScores, confusion_matrix

# Pairs (ground truth, prediction): (0,0) (1,1) (2,1) (2,2) (1,0); one ignored pixel.
PREDICTION = torch.tensor([[0, 1, 1], [2, 2, 0]])
TARGET = torch.tensor([[0, 1, 2], [2, 255, 1]])
EXPECTED_CONFUSION = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]])
# IoU = TP / (row + column - TP): 1/(1+2-1), 1/(2+2-1), 1/(2+1-1).
EXPECTED_IOU = [1 / 2, 1 / 3, 1 / 2]


def test_confusion_matrix_by_hand():
    confusion = confusion_matrix(PREDICTION, TARGET, num_classes=3)
    assert confusion.dtype == torch.int64
    assert torch.equal(confusion, EXPECTED_CONFUSION)


def test_scores_by_hand_background_included_and_absent_classes_left_out():
    scores = SegmentationScores.from_confusion(confusion_matrix(PREDICTION, TARGET, 4))
    assert scores.per_class_iou[:3] == pytest.approx(EXPECTED_IOU)
    assert math.isnan(scores.per_class_iou[3])  # class 3 in neither map
    assert scores.mean_iou == pytest.approx(sum(EXPECTED_IOU) / 3)
    assert scores.pixel_accuracy == pytest.approx(3 / 5)


def test_metric_accumulates_batches():
    metric = SegmentationMetric(3)
    metric.update(PREDICTION[:1], TARGET[:1])
    metric.update(PREDICTION[1:], TARGET[1:])
    assert torch.equal(metric.compute().confusion, EXPECTED_CONFUSION)
    assert metric.compute().mean_iou == pytest.approx(sum(EXPECTED_IOU) / 3)  # no double count
    metric.reset()
    assert metric.confusion.sum() == 0


def test_matches_a_dense_reference_on_random_maps():
    generator = torch.Generator().manual_seed(0)
    prediction = torch.randint(0, 5, (3, 17, 13), generator=generator)
    target = torch.randint(0, 5, (3, 17, 13), generator=generator)
    target[torch.rand(target.shape, generator=generator) < 0.2] = 255
    expected = torch.zeros(5, 5, dtype=torch.int64)
    for truth, predicted in zip(
        target.flatten().tolist(), prediction.flatten().tolist(), strict=True
    ):
        if truth != 255:
            expected[truth, predicted] += 1
    assert torch.equal(confusion_matrix(prediction, target, 5), expected)


def test_values_outside_the_class_range_are_errors():
    with pytest.raises(ValueError, match=r"target holds class indices \[3\]"):
        confusion_matrix(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, 3], [1, 255]]), 3)
    with pytest.raises(ValueError, match=r"prediction holds class indices \[255\]"):
        confusion_matrix(torch.tensor([[0, 255]]), torch.tensor([[0, 1]]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(
            torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), 3
        )


def _ddp_worker(rank, store_path, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        metric = SegmentationMetric(3)
        # Rank 0 scores the first row, rank 1 the second: together the whole example.
        metric.update(PREDICTION[rank : rank + 1], TARGET[rank : rank + 1])
        results.put((rank, metric.compute().confusion.tolist()))
    finally:
        dist.destroy_process_group()


def test_confusion_matrices_are_summed_across_processes(tmp_path):
    # fork: the children inherit the imported modules (spawn would re-import torch, slowly).
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [
        context.Process(target=_ddp_worker, args=(rank, tmp_path / "store", results))
        for rank in range(2)
    ]
    for worker in workers:
        worker.start()
    try:
        merged = dict(results.get(timeout=60) for _ in workers)
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert merged[0] == merged[1] == EXPECTED_CONFUSION.tolist()
