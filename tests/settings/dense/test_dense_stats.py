"""Per-image statistics of the dense objective: summed over the images they give the meters'
dataset-level metrics back (every task), any resample of the images gives the metrics of that
resample, and ``ftn sweep`` uses them for a paired bootstrap of dense comparisons."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ftn.settings.dense.metrics import DepthMeter, EdgeMeter, NormalsMeter, SegmentationMeter
from ftn.settings.dense.setting import JOINT, NORMALS_STATS_RESOLUTION, DenseObjective, DenseSetting
from ftn.training.config import apply_overrides, new_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.fixture(scope="module")
def square_scenes(nyud_scenes) -> Path:
    """More val scenes, square: the meters' statistics need several images."""
    return nyud_scenes(n_train=2, n_val=5, size=(48, 48), seed=3)


class Noisy:
    """A stand-in model: each task's target plus seeded noise (so every metric is non-trivial),
    the same outputs for the same images whatever the batching."""

    def __init__(self, dataset, num_classes: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.out: dict[bytes, dict[str, torch.Tensor]] = {}
        for i in range(len(dataset)):
            s = dataset[i]
            seg = s["semseg"].long().clone()
            seg[seg == 255] = 0
            logits = 2.0 * torch.nn.functional.one_hot(seg, num_classes).permute(2, 0, 1).float()
            logits += 1.5 * torch.randn(logits.shape, generator=g)
            depth = s["depth"].float() * (1 + 0.2 * torch.randn(s["depth"].shape, generator=g)) + 0.05
            normals = s["normals"].float() + 0.4 * torch.randn(s["normals"].shape, generator=g)
            edge = s["edge"].float()
            edge = torch.where(edge == 255, torch.zeros_like(edge), edge)
            edge = 3.0 * edge - 1.5 + 1.2 * torch.randn(edge.shape, generator=g)
            self.out[s["image"].numpy().tobytes()] = {"semseg": logits, "depth": depth.reshape(1, 48, 48),
                                                      "normals": normals, "edge": edge.reshape(1, 48, 48)}

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        outs = [self.out[x.numpy().tobytes()] for x in images]
        return {t: torch.stack([o[t] for o in outs]) for t in outs[0]}


def _setup(square_scenes: Path, *extra: str) -> tuple[DenseObjective, object, Noisy]:
    cfg = apply_overrides(new_config("dense"), [f"data.root={square_scenes}", "data.edge_tolerance_px=1",
                                                "data.joint=true", *extra])
    data = DenseSetting(cfg).data(JOINT)
    return data.objective, data.test, Noisy(data.test, data.objective.num_classes)


def _batches(dataset, size: int):
    return list(DataLoader(dataset, batch_size=size, shuffle=False))


def test_image_stats_sum_back_to_every_meter(square_scenes: Path) -> None:
    objective, test, model = _setup(square_scenes)
    assert objective.tasks == ("semseg", "depth", "normals", "edge") and len(test) == 5
    batches = _batches(test, 2)  # batches of 2, 2 and 1
    metrics = objective.metrics(model, batches)
    stats = objective.example_stats(model, batches)
    assert stats.shape[0] == 5 and stats.dtype == np.float64
    again = objective.metrics_from_stats(stats.sum(0))
    assert set(again) == set(metrics)
    for key, value in metrics.items():
        assert math.isfinite(value), key
        if key == "normals/median_angle":  # 0.5° bins in the statistics, 0.01° in the meter
            assert again[key] == pytest.approx(value, abs=NORMALS_STATS_RESOLUTION / 2 + 0.01)
        else:
            assert again[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert objective.score_from_stats(stats.sum(0)) == pytest.approx(objective.score(metrics), rel=1e-9)
    assert 0 < metrics["semseg/mIoU"] < 1 and 0 < metrics["edge/odsF"] < 1 and metrics["depth/rmse"] > 0
    # The loss is the mean of the per-image losses: the same for any evaluation batch size.
    assert objective.metrics(model, _batches(test, 1))["loss"] == pytest.approx(metrics["loss"], rel=1e-9)


def test_resampled_images_give_the_metrics_of_the_resample(square_scenes: Path) -> None:
    """What the bootstrap relies on: rows weighted by how often each image is drawn equal the
    meters run on the drawn images (a repeated image counts twice), for every task."""
    objective, test, model = _setup(square_scenes)
    draw = [0, 0, 3, 4, 4]
    weights = np.bincount(draw, minlength=len(test)).astype(np.float64)
    stats = objective.example_stats(model, _batches(test, 3))
    from_stats = objective.metrics_from_stats(weights @ stats)
    meters = {"semseg": SegmentationMeter(objective.num_classes), "depth": DepthMeter(),
              "normals": NormalsMeter(resolution_deg=NORMALS_STATS_RESOLUTION),
              "edge": EdgeMeter(objective.d.edge_thresholds, tolerance_px=1)}
    for i in draw:
        s = test[i]
        out = model(s["image"][None])
        for t, m in meters.items():
            pred = torch.sigmoid(out[t]) if t == "edge" else out[t]
            m.update(pred, s[t][None])
    for t, m in meters.items():
        for k, v in m.compute().items():
            if f"{t}/{k}" in from_stats:  # normals' median too: same bins
                assert from_stats[f"{t}/{k}"] == pytest.approx(v, rel=1e-9, abs=1e-12), (t, k)
    seg = meters["semseg"]
    assert np.array_equal(seg.confusion.numpy().ravel(), weights @ stats[:, 2:2 + objective.num_classes ** 2])


def test_joint_stats_split_into_each_tasks_own_layout(square_scenes: Path) -> None:
    """A joint model's rows, split per task, are what each task's own objective gives (the loss
    column aside), so a joint model and per-task models can be compared image by image."""
    objective, test, model = _setup(square_scenes)
    batches = _batches(test, 2)
    joint = objective.example_stats(model, batches)
    metrics = objective.metrics_from_stats(joint.sum(0))
    split = DenseSetting(apply_overrides(new_config("dense"), [f"data.root={square_scenes}", "data.edge_tolerance_px=1",
                                                               "data.joint=true"])).split_example_stats(JOINT, joint)
    assert list(split) == ["semseg", "depth", "normals", "edge"]
    for t, rows in split.items():
        own = DenseObjective((t,), objective.num_classes, objective.d)
        assert np.isnan(rows[:, 0]).all() and np.array_equal(rows[:, 1:], own.example_stats(model, batches)[:, 1:])
        for k, v in own.metrics_from_stats(rows.sum(0)).items():
            if k != "loss":
                assert v == pytest.approx(metrics[k], rel=1e-12, abs=1e-12), k
    assert DenseSetting(new_config("dense")).split_example_stats("depth", joint)["depth"] is joint


def test_meter_image_stats_edge_cases() -> None:
    """Images with no valid pixel add nothing; an exact-median normals meter has no histogram
    columns (its median from statistics is NaN, the rest exact)."""
    depth = DepthMeter()
    target = torch.zeros(2, 8, 8)
    target[1, :4] = 2.0
    rows = depth.image_stats(torch.full((2, 8, 8), 1.5), target)
    assert rows.shape == (2, depth.stats_width()) and not rows[0].any() and rows[1, 0] == 32
    assert depth.from_stats(rows.sum(0))["rmse"] == pytest.approx(0.5)
    exact = NormalsMeter(median="exact")
    pred, tgt = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(1)), torch.zeros(1, 3, 6, 6)
    tgt[:, 2] = 1.0
    exact.update(pred, tgt)
    rows = exact.image_stats(pred, tgt)
    assert rows.shape == (1, exact.stats_width()) == (1, 6)
    back, direct = exact.from_stats(rows.sum(0)), exact.compute()
    assert math.isnan(back["median_angle"]) and not math.isnan(direct["median_angle"])
    assert back["mean_angle"] == pytest.approx(direct["mean_angle"])


@pytest.mark.slow
def test_quick_dense_sweep_uses_the_bootstrap(tmp_path: Path) -> None:
    from ftn.apps.cli import main

    out = tmp_path / "sweep"
    assert main(["sweep", "--demo", "dense", "--quick", "--methods", "ftn", "full", "--seeds", "0", "1",
                 "--grid", "full:data.joint=false,true", "--gain-reference", "full[data.joint = false]",
                 "--compare-axis", "data.joint",
                 "--lr-grid", "ftn=1e-3", "full=1e-3", "--output", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    # −loss per task: per-task models compare image by image; the joint model's tasks differ
    # (one training task), so over seeds.
    # (the last one: --compare-axis, single-task against joint)
    assert [c["kind"] for c in results["comparisons"]] == ["t over seeds + test examples", "t over seeds",
                                                           "t over seeds"]
    assert all(c["low"] <= c["high"] for c in results["comparisons"])
    # Δm against the single-task networks: the reference averages 0 over its seeds; the joint
    # model's statistics split per task, so every Δm comparison is a bootstrap over images.
    groups = {g["grid_point"] if g["method"] == "full" else "ftn": g for g in results["groups"]}
    assert groups["data.joint=false"]["gain"]["mean"] == pytest.approx(0, abs=1e-9)
    gain = results["gain"]
    assert gain["reference"] == "full[data.joint=false]" and set(gain["metrics"]) == {"semseg", "depth", "normals", "edge"}
    assert [c["kind"] for c in gain["comparisons"]] == ["t over seeds + test examples"] * 3
    assert [(c["reference_point"], c["grid_point"]) for c in gain["comparisons"]][2] == \
        ("data.joint=false", "data.joint=true")  # the --compare-axis pair, in Δm too
    for c in gain["comparisons"]:  # the observed difference is the difference of the groups' mean Δm
        ref = groups["ftn" if c["reference"] == "ftn" else c["reference_point"]]
        assert c["diff"] == pytest.approx(ref["gain"]["mean"] - groups[c["grid_point"]]["gain"]["mean"],
                                          abs=0.05)  # the median angle is not in Δm; mean angle exact
        assert c["low"] <= c["diff"] <= c["high"]
    # The joint model's metrics appear under each task in the per-task columns.
    assert set(groups["data.joint=true"]["per_task_metrics"]) >= {"semseg", "depth", "normals", "edge"}
    assert "Multi-task gain" in (out / "table.md").read_text()
    chosen = next(r for r in results["rows"] if r["chosen"])
    stats = np.load(Path(chosen["output"]) / "test_examples.npz")
    assert set(stats.files) == set(json.loads((Path(chosen["output"]) / "results.json").read_text())["tasks"])
