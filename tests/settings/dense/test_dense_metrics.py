"""Dense losses and metrics against values computed by hand on tiny arrays."""

from __future__ import annotations

import math

import pytest
import torch

from ftn.settings.dense.metrics import (
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
from ftn.core.errors import ConfigError, DataError, ShapeError

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
    assert math.isnan(r["iou"][3])  # undefined for a class absent from truth and prediction
    assert r["pixel_acc"] == pytest.approx(0.8)


def test_segmentation_miou_defaults_to_all_classes() -> None:
    # The reference evaluation (Multi-Task-Learning-PyTorch's eval_semseg): per-class
    # TP / max(TP + FP + FN, eps) from the dataset confusion matrix, averaged over all classes;
    # class 3 (absent from truth and prediction) counts as IoU 0.
    m = SegmentationMeter(4)
    m.update(SEG_P, SEG_T)
    assert m.average == "all"
    assert m.compute()["mIoU"] == pytest.approx((0.5 + 2 / 3 + 1.0 + 0.0) / 4)
    present = SegmentationMeter(4, average="present")  # the old default, kept as an option
    present.update(SEG_P, SEG_T)
    assert present.compute()["mIoU"] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    # A class present in the truth but never predicted has IoU 0 under both conventions.
    t, p = torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 1, 1])
    for average in ("all", "present"):
        m = SegmentationMeter(3, average=average)
        m.update(p[None], t[None])
        assert m.compute()["mIoU"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    with pytest.raises(ConfigError):
        SegmentationMeter(4, average="mean")


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


def _edge_scores(prob, gt, **kw) -> dict:
    m = EdgeMeter(**kw)
    m.update(torch.as_tensor(prob, dtype=torch.float32), torch.as_tensor(gt, dtype=torch.float32))
    return m.compute()


def _line(h: int = 40, w: int = 41, col: int = 20) -> torch.Tensor:
    x = torch.zeros(h, w)
    x[:, col] = 1.0
    return x


# The hand cases below use nms=False so that they test thinning and matching alone; edge_nms has
# its own tests. Tolerance 2 px: every case is decided by distances 0, 2 and 3.


def test_edge_double_response_counts_half_false_positives() -> None:
    # Two 1-px predicted lines 2 px either side of a 1-px true edge: each true pixel can justify
    # only one of its two predicted neighbours, so P = 1/2, R = 1, F = 2/3 (as BSDS).
    gt = _line()
    pred = _line(col=18) + _line(col=22)
    r = _edge_scores(pred, gt, tolerance_px=2, nms=False)
    assert r["odsF"] == pytest.approx(2 / 3)
    assert (r["ods_precision"], r["ods_recall"]) == pytest.approx((0.5, 1.0))
    # ... and symmetrically one predicted line between two true edges recalls only half of them.
    r = _edge_scores(_line(), _line(col=18) + _line(col=22), tolerance_px=2, nms=False)
    assert (r["ods_precision"], r["ods_recall"], r["odsF"]) == pytest.approx((1.0, 0.5, 2 / 3))


def test_edge_thick_band_is_thinned() -> None:
    # A flat 21-px-wide band centred on a 1-px true edge (rows 10..49 of column 20), reaching 10 px
    # past each end: thinning leaves exactly the centre line over the true rows, F = 1.
    gt = torch.zeros(60, 41)
    gt[10:50, 20] = 1.0
    band = torch.zeros(60, 41)
    band[:, 10:31] = 1.0
    r = _edge_scores(band, gt, tolerance_px=2, nms=False)
    assert (r["ods_precision"], r["ods_recall"], r["odsF"]) == pytest.approx((1.0, 1.0, 1.0))
    # A band crossing the whole image thins to a line 10 px short at each end (bwmorph does the
    # same): P = 1, R = 80/100.
    band = torch.zeros(100, 41)
    band[:, 10:31] = 1.0
    r = _edge_scores(band, _line(100), tolerance_px=2, nms=False)
    assert (r["ods_precision"], r["ods_recall"]) == pytest.approx((1.0, 0.8))
    assert r["odsF"] == pytest.approx(2 * 0.8 / 1.8)


def test_edge_perfect_empty_and_shifted_predictions() -> None:
    gt = torch.zeros(40, 41)
    gt[5:35, 8] = 1.0  # a vertical, a horizontal and a diagonal line: thinning keeps them
    gt[30, 15:35] = 1.0
    idx = torch.arange(5, 25)
    gt[idx, idx + 12] = 1.0
    for kw in ({"tolerance_px": 2}, {"tolerance_px": 2, "thin": False}, {"max_dist": 0.011}):
        r = _edge_scores(gt, gt, nms=False, **kw)
        assert (r["odsF"], r["oisF"], r["ods_precision"], r["ods_recall"]) == pytest.approx((1.0, 1.0, 1.0, 1.0))
    r = _edge_scores(torch.zeros(40, 41), gt, tolerance_px=2, nms=False)
    assert (r["odsF"], r["oisF"], r["ods_precision"], r["ods_recall"]) == (0.0, 0.0, 0.0, 0.0)
    line = _line()
    assert _edge_scores(_line(col=23), line, tolerance_px=2, nms=False)["odsF"] == 0.0  # 3 px > 2
    assert _edge_scores(_line(col=22), line, tolerance_px=2, nms=False)["odsF"] == pytest.approx(1.0)  # ≤ r
    # Diagonal neighbour at √2: outside a 1-px tolerance, inside a 1.5-px one (Euclidean).
    gt1, pred1 = torch.zeros(6, 6), torch.zeros(6, 6)
    gt1[2, 2], pred1[3, 3] = 1.0, 1.0
    assert _edge_scores(pred1, gt1, tolerance_px=1, nms=False)["odsF"] == 0.0
    assert _edge_scores(pred1, gt1, tolerance_px=1.5, nms=False)["odsF"] == pytest.approx(1.0)


def test_edge_default_tolerance_is_nyud() -> None:
    m = EdgeMeter()
    assert m.radius(480, 640) == pytest.approx(0.011 * 800)  # 8.8 px on NYUD images
    assert EdgeMeter(max_dist=0.0075).radius(480, 640) == pytest.approx(6.0)  # BSDS500
    assert EdgeMeter(tolerance_px=1.0).radius(480, 640) == 1.0
    assert m.thresholds.size == 99 and m.thresholds[0] == pytest.approx(0.01)
    with pytest.raises(ConfigError):
        EdgeMeter(tolerance_px=-1)


def test_edge_ods_interpolates_between_thresholds() -> None:
    # True edges A and B; A predicted at 0.9, B at 0.4, plus two false lines C and D at 0.4.
    # t = 0.3: P = 2/4, R = 1; t = 0.6: P = 1, R = 1/2; F = 2/3 at both grid points. BSDS
    # interpolates P and R linearly (100 steps) between neighbouring thresholds: F ≈ 0.75.
    gt = _line(col=5) + _line(col=15)
    pred = 0.9 * _line(col=5) + 0.4 * (_line(col=15) + _line(col=25) + _line(col=35))
    r = _edge_scores(pred, gt, thresholds=[0.3, 0.6], tolerance_px=2, nms=False)
    assert r["f"] == pytest.approx([2 / 3, 2 / 3])
    d = [k / 99 for k in range(100)]
    best = max(2 * (0.5 + x / 2) * (1 - x / 2) / 1.5 for x in d)
    assert r["odsF"] == pytest.approx(best) and r["odsF"] == pytest.approx(0.75, abs=1e-4)
    assert r["ods_threshold"] == pytest.approx(0.45, abs=0.3 / 99)  # d = 49/99 or 50/99: F ties


def test_edge_ois_uses_each_images_best_threshold() -> None:
    thresholds = [0.3, 0.6]
    m = EdgeMeter(thresholds, tolerance_px=2, nms=False)
    gt = _line(col=10)
    m.update(0.4 * gt, gt)  # image A: F = (1, 0) -> best t = 0.3: M = 40, E = 40
    m.update(0.8 * gt + 0.4 * _line(col=30), gt)  # image B: F = (2/3, 1) -> t = 0.6: M = E = 40
    # image C: no true edge, false lines at 0.8 and 0.4: F = (0, 0); BSDS takes the last maximum
    # (t = 0.6), so 40 false positives count, not 80.
    m.update(0.8 * _line(col=10) + 0.4 * _line(col=30), torch.zeros(40, 41))
    r = m.compute()
    p, rec = 80 / 120, 80 / 80
    assert r["oisF"] == pytest.approx(2 * p * rec / (p + rec))
    assert (r["ois_precision"], r["ois_recall"]) == pytest.approx((p, rec))
    # ODS pools the counts per threshold: t = 0.3: M = 80, E = 40 + 80 + 80, G = 80.
    assert r["precision"] == pytest.approx([80 / 200, 40 / 80])
    assert r["recall"] == pytest.approx([1.0, 0.5])


def test_edge_meter_pools_counts_and_ignores() -> None:
    gt = _line(20, 20, col=10)
    prob = 0.9 * gt
    prob[0, 0] = 0.5  # a weaker false positive far away
    gt_ign = gt.clone()
    gt_ign[0, 0] = 255  # ...that now lies in an ignored (padded) region
    m = EdgeMeter(tolerance_px=1, nms=False)
    m.update(prob[None, None], gt_ign[None, None])
    assert m.compute()["f"][0] == pytest.approx(1.0)  # even at the lowest threshold
    # Pooling: a second image with a 5-pixel true edge and no prediction adds true pixels but no
    # predictions: precision stays 1, the pooled recall is 20 / (20 + 5).
    gt2 = torch.zeros(20, 20)
    gt2[3, :5] = 1.0
    m.update(torch.zeros(20, 20), gt2)
    r = m.compute()
    assert (r["ods_precision"], r["ods_recall"]) == pytest.approx((1.0, 20 / 25))
    with pytest.raises(DataError):
        m.update(prob * 3 - 1, gt)  # logits, not probabilities


def test_thin_edges_bwmorph_example() -> None:
    from ftn.settings.dense.metrics import thin_edges

    # The example of MATLAB's / scikit-image's documentation of bwmorph(·, 'thin') / thin.
    square = torch.zeros(7, 7, dtype=torch.bool)
    square[1:-1, 2:-2] = True
    square[0, 1] = True
    expected = torch.zeros(7, 7, dtype=torch.bool)
    expected[0, 1], expected[1, 2], expected[2:5, 3] = True, True, True
    assert torch.equal(thin_edges(square), expected)
    stack = torch.stack([square, torch.ones(7, 7, dtype=torch.bool)])  # maps are independent
    assert torch.equal(thin_edges(stack)[0], expected)
    assert int(thin_edges(stack)[1].sum()) >= 1


def test_thin_edges_matches_scikit_image() -> None:
    thin = pytest.importorskip("skimage.morphology").thin
    from ftn.settings.dense.metrics import thin_edges

    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        x = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 23, 31, generator=g), 3, 1, 1)[0, 0]
        m = x > x.median()
        assert torch.equal(thin_edges(m), torch.from_numpy(thin(m.numpy())))


def _max_matching_brute(pred: torch.Tensor, gt: torch.Tensor, r: float) -> int:
    """Kuhn's augmenting paths on the pairs within r: an independent maximum matching."""
    p, g = pred.nonzero().tolist(), gt.nonzero().tolist()
    adj = [[j for j, b in enumerate(g) if (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2 <= r * r] for a in p]
    owner: dict[int, int] = {}

    def augment(i: int, seen: set[int]) -> bool:
        for j in adj[i]:
            if j not in seen:
                seen.add(j)
                if j not in owner or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return sum(augment(i, set()) for i in range(len(p)))


def test_correspond_counts_is_a_maximum_matching() -> None:
    from ftn.settings.dense.metrics import correspond_counts

    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        gt = torch.rand(14, 17, generator=g) < 0.15
        preds = torch.rand(3, 14, 17, generator=g) < 0.2
        preds[1] = preds[0]  # a repeated map reuses its count
        r = [0.5, 1.0, 1.5, 2.3][trial % 4]
        got = correspond_counts(preds.numpy(), gt.numpy(), r)
        assert got.tolist() == [_max_matching_brute(preds[k], gt, r) for k in range(3)]


def test_edge_nms_keeps_the_ridge() -> None:
    from ftn.settings.dense.metrics import edge_nms

    # A vertical ridge with a Gaussian profile: only its centre column survives, with the value
    # of convTri(E, 1) there; the outermost rows are zeroed and the next 4 scaled by y/5.
    cols = torch.arange(32, dtype=torch.float64)
    e = torch.exp(-((cols - 16) ** 2) / 4).expand(32, 32).clone()
    out = edge_nms(e)
    assert out.shape == e.shape and out.dtype == e.dtype
    support = out > 0
    assert support[:, 16].sum() == 30 and int(support.sum()) == 30
    centre = (e[0, 15] + 2 * e[0, 16] + e[0, 17]) / 4
    assert float(out[16, 16]) == pytest.approx(float(centre))
    assert float(out[2, 16]) == pytest.approx(float(centre) * 2 / 5)
    # Through the meter (NMS on by default): a blurred line scores F = 1 against its centre
    # except for the suppressed first and last rows: R = 30/32.
    gt = torch.zeros(32, 32)
    gt[:, 16] = 1.0
    r = _edge_scores(e, gt, tolerance_px=1)
    assert (r["ods_precision"], r["ods_recall"]) == pytest.approx((1.0, 30 / 32))


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
