"""Dense losses and metrics against values computed by hand on tiny arrays."""

from __future__ import annotations

import math

import pytest
import torch

from ftn.dense.metrics import (
    DepthMeter,
    EdgeMeter,
    NormalsMeter,
    SegmentationMeter,
    depth_loss,
    edge_loss,
    multi_task_gain,
    normals_loss,
    semseg_loss,
)
from ftn.errors import ConfigError, DataError, ShapeError

# --------------------------------------------------------------------------------------------
# Semantic segmentation

# 2×3 image, 4 classes; class 3 occurs nowhere and the last pixel is ignored.
SEG_T = torch.tensor([[0, 0, 1], [1, 2, 255]])
SEG_P = torch.tensor([[0, 1, 1], [1, 2, 0]])
# Confusion (rows = truth): [[1, 1, 0], [0, 2, 0], [0, 0, 1]] -> TP = (1, 2, 1), FP = (0, 1, 0),
# FN = (1, 0, 0): IoU = (1/2, 2/3, 1), pixel accuracy 4/5.


def test_segmentation_meter_known_confusion() -> None:
    m = SegmentationMeter(4)
    m.update(SEG_P, SEG_T)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 2] = 1, 1, 2, 1
    assert torch.equal(m.confusion, expected)
    r = m.compute()
    assert r["iou"][:3] == pytest.approx([0.5, 2 / 3, 1.0])
    assert math.isnan(r["iou"][3])
    assert r["mIoU"] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)  # mean over present classes
    assert r["pixel_acc"] == pytest.approx(0.8)

    all_cls = SegmentationMeter(4, average="all")
    all_cls.update(SEG_P, SEG_T)
    assert all_cls.compute()["mIoU"] == pytest.approx((0.5 + 2 / 3 + 1.0 + 0.0) / 4)


def test_segmentation_meter_logits_batches_and_errors() -> None:
    logits = torch.nn.functional.one_hot(SEG_P, 4).permute(2, 0, 1).float()  # (C, H, W)
    a, b = SegmentationMeter(4), SegmentationMeter(4)
    a.update(logits, SEG_T)  # single image with scores
    b.update(SEG_P[None, :1], SEG_T[None, :1])  # the same pixels in two batches
    b.update(SEG_P[None, 1:], SEG_T[None, 1:])
    assert torch.equal(a.confusion, b.confusion)
    a.update(logits[None], SEG_T[None, None])  # (N, C, H, W) with (N, 1, H, W) target
    assert int(a.confusion.sum()) == 10
    with pytest.raises(DataError):
        SegmentationMeter(2).update(SEG_P, SEG_T)  # label 2 is outside 0..1
    with pytest.raises(ShapeError):
        SegmentationMeter(4).update(SEG_P[:, :2], SEG_T)


def test_semseg_loss_ignores_255() -> None:
    logits = torch.zeros(1, 4, 2, 3, requires_grad=True)  # uniform -> CE = log 4 everywhere
    loss = semseg_loss(logits, SEG_T[None])
    assert loss.item() == pytest.approx(math.log(4))
    skewed = torch.zeros(1, 4, 2, 3)
    skewed[0, 0, 1, 2] = 50.0  # a confident score on the ignored pixel changes nothing
    assert float(semseg_loss(skewed, SEG_T[None])) == pytest.approx(math.log(4))
    empty = semseg_loss(logits, torch.full((1, 2, 3), 255))
    assert empty.item() == 0.0
    empty.backward()  # still part of the graph


# --------------------------------------------------------------------------------------------
# Depth


def test_depth_rmse_is_pooled_over_pixels() -> None:
    m = DepthMeter()
    t1, p1 = torch.tensor([[1.0, 2.0], [0.0, 4.0]]), torch.tensor([[2.0, 2.0], [5.0, 4.0]])
    t2, p2 = torch.full((2, 2), 2.0), torch.full((2, 2), 4.0)
    m.update(p1[None, None], t1[None, None])
    m.update(p2, t2)
    r = m.compute()
    # Valid pixels: 3 in image 1 (errors 1, 0, 0; the 0-depth pixel is skipped), 4 in image 2
    # (errors 2). Pooled: sqrt((1 + 4·4) / 7); the mean of per-image RMSEs would be
    # (sqrt(1/3) + 2) / 2 ≈ 1.289 instead.
    assert r["n_valid"] == 7
    assert r["rmse"] == pytest.approx(math.sqrt(17 / 7))
    assert abs(r["rmse"] - (math.sqrt(1 / 3) + 2) / 2) > 0.2
    assert r["abs_rel"] == pytest.approx((1 / 1 + 4 * (2 / 2)) / 7)
    assert r["mae"] == pytest.approx(9 / 7)
    assert r["delta1"] == pytest.approx(2 / 7)  # only the two exact pixels are within 1.25×
    assert r["log_rmse"] == pytest.approx(math.sqrt((math.log(2) ** 2 * 5) / 7))

    loss = depth_loss(p1, t1)
    assert loss.item() == pytest.approx(1 / 3)
    assert math.isnan(DepthMeter().compute()["rmse"])


# --------------------------------------------------------------------------------------------
# Normals


def _normals_case() -> tuple[torch.Tensor, torch.Tensor]:
    # Four pixels in a row: 0°, 90°, 45° and one invalid (zero) target.
    target = torch.tensor([[0.0, 0, 1], [0, 0, 1], [1, 0, 0], [0, 0, 0]]).T.reshape(1, 3, 1, 4)
    pred = torch.tensor([[0.0, 0, 2], [1, 0, 0], [1, 1, 0], [0, 1, 0]]).T.reshape(1, 3, 1, 4)
    return pred, target


def test_normals_meter_known_angles() -> None:
    pred, target = _normals_case()
    for mode in ("exact", "histogram"):
        m = NormalsMeter(median=mode)
        m.update(pred, target)
        r = m.compute()
        assert r["n_valid"] == 3
        assert r["mean_angle"] == pytest.approx(45.0)
        assert r["median_angle"] == pytest.approx(45.0, abs=0.0051 if mode == "histogram" else 1e-9)
        assert r["rmse_angle"] == pytest.approx(math.sqrt((0 + 90**2 + 45**2) / 3))
        assert r["within_11.25"] == pytest.approx(1 / 3)
        assert r["within_22.5"] == pytest.approx(1 / 3)
        assert r["within_30"] == pytest.approx(1 / 3)
    # Even count: numpy's median averages the two middle values (30° and 45°).
    m = NormalsMeter(median="exact")
    m.update(pred, target)
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    m.update(torch.tensor([s, 0.0, c]).view(3, 1, 1), torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1))
    assert m.compute()["median_angle"] == pytest.approx(37.5)
    assert m.compute()["within_30"] == pytest.approx(1 / 4)  # 30° itself is not "under 30°"


def test_normals_loss_formulas() -> None:
    pred, target = _normals_case()
    pred = pred.clone().requires_grad_(True)
    # L1 on normalised predictions: per valid pixel 0, |1|+|−1| = 2, (1−1/√2)+1/√2 = 1; / (3·3).
    loss = normals_loss(pred, target)
    assert loss.item() == pytest.approx(3 / 9)
    loss.backward()
    assert normals_loss(pred, target, kind="cosine").item() == pytest.approx((0 + 1 + (1 - 1 / math.sqrt(2))) / 3)
    with pytest.raises(ConfigError):
        normals_loss(pred, target, kind="l2")


# --------------------------------------------------------------------------------------------
# Edges


def _vertical_edge_case() -> tuple[torch.Tensor, torch.Tensor]:
    gt = torch.zeros(5, 5)
    gt[:, 2] = 1.0  # a vertical GT edge
    prob = torch.zeros(5, 5)
    prob[:, 3] = 0.9  # the prediction is one pixel to the right...
    prob[0, 0] = 0.5  # ...plus a weaker false positive far away
    return prob, gt


def test_edge_ods_tolerance_matters() -> None:
    prob, gt = _vertical_edge_case()
    exact = EdgeMeter(tolerance_px=0)
    exact.update(prob, gt)
    assert exact.compute()["odsF"] == 0.0  # nothing coincides exactly

    tol = EdgeMeter(tolerance_px=1)
    tol.update(prob, gt)
    r = tol.compute()
    # t in (0.5, 0.9]: 5 predictions, all within 1 px of the GT, every GT pixel has one -> F = 1.
    assert r["odsF"] == pytest.approx(1.0)
    assert r["ods_threshold"] == pytest.approx(0.51)  # first grid value above 0.5
    assert r["oisF"] == pytest.approx(1.0)  # one image: OIS = ODS
    # t ≤ 0.5: the far pixel is a false positive, P = 5/6, R = 1 -> F = 10/11.
    k = tol.thresholds.tolist().index(pytest.approx(0.5))
    assert r["precision"][k] == pytest.approx(5 / 6)
    assert r["f"][k] == pytest.approx(10 / 11)
    # t > 0.9: nothing predicted: P = 0 by convention, R = 0, F = 0.
    assert r["f"][-1] == 0.0


def test_edge_tolerance_is_euclidean_and_scales_with_diagonal() -> None:
    gt = torch.zeros(6, 6)
    gt[2, 2] = 1.0
    prob = torch.zeros(6, 6)
    prob[3, 3] = 1.0  # diagonal neighbour: distance √2
    f = {}
    for r in (1.0, 1.5):
        m = EdgeMeter(tolerance_px=r)
        m.update(prob, gt)
        f[r] = m.compute()["odsF"]
    assert f[1.0] == 0.0 and f[1.5] == pytest.approx(1.0)
    assert EdgeMeter().radius(480, 640) == pytest.approx(0.0075 * 800)


def test_edge_meter_pools_counts_and_ignores() -> None:
    prob, gt = _vertical_edge_case()
    gt_ign = gt.clone()
    gt_ign[0, 0] = 255  # the false positive now lies in an ignored (padded) region
    m = EdgeMeter(tolerance_px=1)
    m.update(prob[None, None], gt_ign[None, None])
    assert m.compute()["f"][0] == pytest.approx(1.0)  # even at the lowest threshold
    # Pooling: a second image with a 4-pixel GT edge and no prediction adds GT pixels but no
    # predictions, so at t = 0.51 precision stays 1 and the pooled recall is 5 / (5 + 4).
    gt2 = torch.zeros(5, 5)
    gt2[0, :4] = 1.0
    m.update(torch.zeros(5, 5), gt2)
    r = m.compute()
    p, rec = 1.0, 5 / 9
    assert r["odsF"] == pytest.approx(2 * p * rec / (p + rec))
    with pytest.raises(DataError):
        m.update(prob * 3 - 1, gt)  # logits, not probabilities


def test_edge_loss_weighted_bce() -> None:
    logits = torch.tensor([[0.0, 0.0, 5.0]], requires_grad=True)
    target = torch.tensor([[1.0, 0.0, 255.0]])
    # σ(0) = 1/2 on both labelled pixels: (0.95·ln2 + 0.05·ln2) / 2 valid pixels.
    loss = edge_loss(logits, target)
    assert loss.item() == pytest.approx(math.log(2) / 2)
    loss.backward()
    x = torch.tensor([[2.0, -1.0]])
    y = torch.tensor([[1.0, 0.0]])
    expected = (0.95 * math.log1p(math.exp(-2)) + 0.05 * math.log1p(math.exp(-1))) / 2
    assert float(edge_loss(x, y)) == pytest.approx(expected)


# --------------------------------------------------------------------------------------------
# Multi-task gain


def test_multi_task_gain_known_table() -> None:
    single = {"mIoU": 0.40, "rmse": 0.60, "mean_angle": 20.0, "odsF": 0.70}
    multi = {"mIoU": 0.42, "rmse": 0.63, "mean_angle": 19.0, "odsF": 0.70}
    # +5 % mIoU, RMSE 5 % worse, angle 5 % better, odsF unchanged: (5 − 5 + 5 + 0) / 4 = 1.25 %.
    assert multi_task_gain(multi, single) == pytest.approx(0.0125)
    words = {"mIoU": "higher", "rmse": "lower", "mean_angle": "lower", "odsF": "higher"}
    assert multi_task_gain(multi, single, words) == pytest.approx(0.0125)
    assert multi_task_gain(multi, single, metrics=["rmse"]) == pytest.approx(-0.05)
    with pytest.raises(ConfigError):
        multi_task_gain({"foo": 1.0}, {"foo": 2.0})  # no direction known
    with pytest.raises(ConfigError):
        multi_task_gain(multi, {**single, "rmse": 0.0})
    with pytest.raises(ConfigError):
        multi_task_gain(multi, {"mIoU": 0.4})
