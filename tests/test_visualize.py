"""Overlay grids: size, column order, colours, PNG output."""

import numpy as np
import pytest
import torch
from PIL import Image

from wsss_fast.data import voc_palette
from wsss_fast.visualize import overlay_grid, save_overlay_grid

HEIGHT, WIDTH = 20, 30


def _batch(count=3):
    images = np.full((count, HEIGHT, WIDTH, 3), 128, dtype=np.uint8)
    cams = torch.rand(count, 2, 5, 8)  # token-grid CAMs of two classes, resized per cell
    labels = np.zeros((count, HEIGHT, WIDTH), dtype=np.int64)
    labels[:, :, WIDTH // 2 :] = 1
    return images, cams, labels


def test_grid_holds_one_row_per_image_and_one_column_per_input():
    images, cams, labels = _batch()
    grid = overlay_grid(images, cams, labels, labels, labels, gap=2)
    assert grid.shape == (3 * HEIGHT + 2 * 2, 5 * WIDTH + 4 * 2, 3)
    assert grid.dtype == np.uint8
    assert (grid[HEIGHT : HEIGHT + 2] == 255).all()  # the gap between rows is white
    only_images_and_truth = overlay_grid(images, ground_truths=labels, gap=0)
    assert only_images_and_truth.shape == (3 * HEIGHT, 2 * WIDTH, 3)


def test_labels_are_drawn_in_voc_colours_over_the_image():
    images, _, labels = _batch(1)
    grid = overlay_grid(images, ground_truths=labels, gap=0)
    truth_cell = grid[:, WIDTH:]
    red = voc_palette()[1].astype(np.float32)  # class 1: (128, 0, 0)
    expected = np.round(0.3 * 128 + 0.7 * red).astype(np.uint8)
    assert (truth_cell[:, WIDTH // 2 :] == expected).all()
    assert (truth_cell[:, : WIDTH // 2] == round(0.3 * 128)).all()  # background is black
    assert (grid[:, :WIDTH] == 128).all()  # the image column is the image


def test_save_writes_a_png_of_the_grid_size(tmp_path):
    images, cams, labels = _batch(2)
    path = save_overlay_grid(
        tmp_path / "overlays" / "step_100.png", images, cams, labels, cell_size=(40, 60)
    )
    with Image.open(path) as written:
        assert written.format == "PNG" and written.size == (3 * 60 + 2 * 2, 2 * 40 + 2)


def test_mismatched_inputs_are_errors():
    images, _, labels = _batch(3)
    with pytest.raises(ValueError, match="predictions holds 2 items for 3 images"):
        overlay_grid(images, predictions=labels[:2])
    with pytest.raises(ValueError, match=r"images\[0\] must be \(H, W, 3\) uint8"):
        overlay_grid(images.astype(np.float32))
