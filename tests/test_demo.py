"""The main job until the trainer lands: python -m wsss_fast.demo."""

import json

from wsss_fast.demo import main


def test_demo_refines_coarse_labels_and_writes_its_outputs(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--images", "3", "--size", "64", "--iterations", "5"]) == 0
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["images"] == 3
    # The CRF must improve on the noisy coarse maps it starts from.
    assert summary["miou_crf"] > summary["miou_coarse"]
    assert (tmp_path / "overlays.png").stat().st_size > 0
    assert "mIoU after dense CRF" in capsys.readouterr().out
