"""Losses and dataset-level metrics for the four NYUD tasks, and the multi-task gain Δm.

Conventions follow Multi-Task-Learning-PyTorch / RCM (see ``docs/research-notes.md`` §2):
semantic labels use 255 as "ignore"; depth 0 and all-zero normals mark invalid pixels; edge
targets are {0, 1} with 255 = ignore (padding added by augmentation).

Every metric is an accumulator: ``update(pred, target)`` for each batch, ``compute()`` once for
the whole dataset, ``reset()`` to start again. Statistics are *pooled over all pixels of the
dataset* (never a mean of per-image values), as the reference evaluation code does. Ratios are
returned as fractions in [0, 1] (multiply by 100 for the usual tables); angles in degrees.
Accumulators keep their sums on the CPU in float64/int64, so long evaluations do not lose
precision, and accept tensors on any device.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, DataError, ShapeError

__all__ = [
    "IGNORE_INDEX",
    "semseg_loss",
    "depth_loss",
    "normals_loss",
    "edge_loss",
    "SegmentationMeter",
    "DepthMeter",
    "NormalsMeter",
    "EdgeMeter",
    "DEFAULT_DIRECTIONS",
    "multi_task_gain",
]

IGNORE_INDEX = 255


# --------------------------------------------------------------------------------------------
# Shape helpers


def _map_shape(x: Tensor, name: str) -> Tensor:
    """(H, W), (N, H, W) or (N, 1, H, W) -> (N, H, W)."""
    if x.dim() == 2:
        return x[None]
    if x.dim() == 4 and x.shape[1] == 1:
        return x[:, 0]
    if x.dim() == 3:
        return x
    raise ShapeError(f"{name} must be (H, W), (N, H, W) or (N, 1, H, W), got {tuple(x.shape)}")


def _same_maps(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    p, t = _map_shape(pred, "prediction"), _map_shape(target, "target")
    if p.shape != t.shape:
        raise ShapeError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    return p, t


def _vector_maps(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(3, H, W) or (N, 3, H, W) pairs -> (N, 3, H, W)."""
    p = pred[None] if pred.dim() == 3 else pred
    t = target[None] if target.dim() == 3 else target
    if p.dim() != 4 or p.shape[1] != 3 or p.shape != t.shape:
        raise ShapeError(
            f"normals must both be (N, 3, H, W) or (3, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    return p, t


def _zero_loss(x: Tensor) -> Tensor:
    # A loss of exactly 0 that still belongs to the graph, so backward() works on an all-invalid
    # batch (e.g. a crop that fell entirely into padding).
    return x.sum() * 0.0


# --------------------------------------------------------------------------------------------
# Losses


def semseg_loss(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Cross-entropy averaged over labelled pixels.

    ``L = (1/|V|) Σ_{p∈V} −log softmax(z_p)[y_p]`` with ``V = {p : y_p ≠ ignore_index}``;
    ``logits`` (N, C, H, W), ``target`` (N, H, W) long. 0 when no pixel is labelled.
    """
    if logits.dim() != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ShapeError(f"expected logits (N, C, H, W) and target (N, H, W), got {tuple(logits.shape)} and {tuple(target.shape)}")
    if not bool((target != ignore_index).any()):
        return _zero_loss(logits)
    return F.cross_entropy(logits, target.long(), ignore_index=ignore_index)


def depth_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Masked L1: ``L = (1/|V|) Σ_{p∈V} |d_p − d*_p|`` with ``V = {p : d*_p > 0}``.

    Shapes (N, 1, H, W), (N, H, W) or (H, W), equal for both. 0 when no pixel is valid.
    """
    p, t = _same_maps(pred, target)
    valid = t > 0
    n = valid.sum()
    if int(n) == 0:
        return _zero_loss(pred)
    return ((p - t).abs() * valid).sum() / n


def normals_loss(pred: Tensor, target: Tensor, kind: str = "l1") -> Tensor:
    """Loss on L2-normalised predicted normals over valid pixels ``V = {p : ‖n*_p‖ > 0}``.

    - ``kind="l1"`` (default, Multi-Task-Learning-PyTorch's ``NormalsLoss(normalize=True)``):
      ``L = (1/(3|V|)) Σ_{p∈V} Σ_{c=1..3} |n̂_pc − n*_pc|``, a mean over valid *elements*.
    - ``kind="cosine"``: ``L = (1/|V|) Σ_{p∈V} (1 − n̂_p · n*_p/‖n*_p‖)``.

    ``n̂ = pred/‖pred‖``. Shapes (N, 3, H, W) or (3, H, W). 0 when no pixel is valid.
    """
    if kind not in ("l1", "cosine"):
        raise ConfigError(f"normals loss kind must be 'l1' or 'cosine', got {kind!r}")
    p, t = _vector_maps(pred, target)
    valid = t.norm(dim=1) > 0  # (N, H, W)
    n = valid.sum()
    if int(n) == 0:
        return _zero_loss(pred)
    p = F.normalize(p, dim=1, eps=1e-12)
    if kind == "l1":
        return ((p - t).abs().sum(dim=1) * valid).sum() / (3 * n)
    cos = (p * F.normalize(t, dim=1, eps=1e-12)).sum(dim=1)
    return ((1.0 - cos) * valid).sum() / n


def edge_loss(logits: Tensor, target: Tensor, pos_weight: float = 0.95, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Class-balanced binary cross-entropy on edge logits (RCM / Multi-Task-Learning-PyTorch).

    ``L = (1/|V|) [ w Σ_{p∈V, y_p=1} −log σ(x_p) + (1−w) Σ_{p∈V, y_p=0} −log(1−σ(x_p)) ]`` with
    ``w = pos_weight`` (0.95 on NYUD: edges are rare, so positives weigh 19× more) and ``V`` the
    pixels whose target is not ``ignore_index`` (targets ≥ 0.5 count as edges). Without ignored
    pixels this equals the reference ``BalancedCrossEntropyLoss(size_average=True)``. Note the
    reference multiplies this loss by 50 in its NYUD task weights; that is a loss *weight*, not
    part of this function.
    """
    if not 0.0 <= pos_weight <= 1.0:
        raise ConfigError(f"pos_weight must lie in [0, 1], got {pos_weight}")
    x, t = _same_maps(logits, target)
    valid = t != ignore_index
    n = valid.sum()
    if int(n) == 0:
        return _zero_loss(logits)
    y = (t >= 0.5) & valid
    weight = torch.where(y, pos_weight, 1.0 - pos_weight) * valid
    bce = F.binary_cross_entropy_with_logits(x, y.to(x.dtype), reduction="none")  # stable log σ
    return (weight * bce).sum() / n


# --------------------------------------------------------------------------------------------
# Semantic segmentation


class SegmentationMeter:
    """Confusion-matrix accumulator for mIoU and pixel accuracy.

    ``cm[i, j]`` counts labelled pixels of true class ``i`` predicted as ``j`` (pixels whose
    target is ``ignore_index`` are skipped). Per class: ``IoU_c = TP/(TP + FP + FN)`` with
    ``TP = cm[c, c]``, ``FP = Σ_i cm[i, c] − TP``, ``FN = Σ_j cm[c, j] − TP``.

    ``average="present"`` (default): ``mIoU`` is the mean over the classes that occur in the
    ground truth *or* the prediction (TP + FP + FN > 0); a class absent from both has no defined
    IoU and is left out (its entry in ``iou`` is NaN). ``average="all"``: mean over all
    ``num_classes``, an absent class counting as IoU 0 (the reference code's
    ``tp / max(tp + fp + fn, eps)``). Both agree whenever every class occurs, as on NYUD val.
    ``pixel_acc = Σ_c TP_c / Σ cm``.

    ``update(pred, target)``: ``pred`` is logits/scores (N, C, H, W) (argmax over C) or labels
    (N, H, W); ``target`` labels (N, H, W). Single images without N are accepted too.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, average: str = "present") -> None:
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        if average not in ("present", "all"):
            raise ConfigError(f"average must be 'present' or 'all', got {average!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.average = average
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        t = _map_shape(target, "target")
        p, c = pred, self.num_classes
        # Scores carry a class axis of length C: (N, C, H, W), or (C, H, W) for one image.
        if p.dim() == 4 and p.shape[1] == c and c > 1:
            p = p.argmax(dim=1)
        elif p.dim() == 3 and target.dim() == 2 and p.shape[0] == c:
            p = p.argmax(dim=0)
        p = _map_shape(p, "prediction")
        if p.shape != t.shape:
            raise ShapeError(f"prediction {tuple(pred.shape)} does not match target {tuple(target.shape)}")
        t = t.long()
        valid = t != self.ignore_index
        t, p = t[valid], p[valid].long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= c):
            raise DataError(f"target label outside 0..{c - 1} (and not {self.ignore_index}): {int(t.max())}")
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= c):
            raise DataError(f"predicted label outside 0..{c - 1}")
        self.confusion += torch.bincount(t * c + p, minlength=c * c).reshape(c, c).cpu()

    def compute(self) -> dict[str, float | list[float]]:
        """``{"mIoU", "pixel_acc", "iou": per-class list (NaN where undefined)}``."""
        cm = self.confusion.double()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
        if self.average == "present":
            present = union > 0
            miou = float(iou[present].mean()) if bool(present.any()) else float("nan")
        else:
            miou = float(torch.nan_to_num(iou, nan=0.0).mean())
        total = float(cm.sum())
        return {
            "mIoU": miou,
            "pixel_acc": float(tp.sum()) / total if total else float("nan"),
            "iou": [float(v) for v in iou],
        }


# --------------------------------------------------------------------------------------------
# Depth


class DepthMeter:
    """Depth errors pooled over all valid pixels ``V = {p : d*_p > 0}`` of the dataset.

    - ``rmse = sqrt(Σ_V (d − d*)² / |V|)`` — pooled, *not* the mean of per-image RMSEs (the two
      differ whenever images have different numbers of valid pixels or errors);
    - ``abs_rel = (1/|V|) Σ_V |d − d*| / d*``; ``mae = (1/|V|) Σ_V |d − d*|``;
    - ``log_rmse = sqrt(Σ_V (log d − log d*)² / |V|)``, predictions clamped to ≥ 1e-9 first;
    - ``delta1`` = fraction of V with ``max(d/d*, d*/d) < 1.25``.

    ``update(pred, target)``: equal shapes (N, 1, H, W), (N, H, W) or (H, W). NaN when V is empty.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.sq = self.abs = self.rel = self.log_sq = 0.0
        self.delta1 = 0

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        p, t = _same_maps(pred, target)
        valid = (t > 0) & torch.isfinite(t)
        p, t = p[valid].double(), t[valid].double()
        err = p - t
        pc = p.clamp_min(1e-9)
        self.n += int(t.numel())
        self.sq += float((err * err).sum())
        self.abs += float(err.abs().sum())
        self.rel += float((err.abs() / t).sum())
        self.log_sq += float(((pc.log() - t.log()) ** 2).sum())
        self.delta1 += int((torch.maximum(pc / t, t / pc) < 1.25).sum())

    def compute(self) -> dict[str, float]:
        """``{"rmse", "abs_rel", "mae", "log_rmse", "delta1", "n_valid"}``."""
        n = self.n
        if n == 0:
            nan = float("nan")
            return {"rmse": nan, "abs_rel": nan, "mae": nan, "log_rmse": nan, "delta1": nan, "n_valid": 0}
        return {
            "rmse": math.sqrt(self.sq / n),
            "abs_rel": self.rel / n,
            "mae": self.abs / n,
            "log_rmse": math.sqrt(self.log_sq / n),
            "delta1": self.delta1 / n,
            "n_valid": n,
        }


# --------------------------------------------------------------------------------------------
# Surface normals


class NormalsMeter:
    """Angular error of predicted normals over valid pixels ``V = {p : ‖n*_p‖ > 0}``.

    ``θ_p = degrees(arccos(clip(n̂_p · n*_p/‖n*_p‖, −1, 1)))`` with ``n̂ = pred/‖pred‖`` (a zero
    prediction counts as 90°). Reported, pooled over the dataset: ``mean_angle``,
    ``median_angle`` (numpy's median: the mean of the two middle values for an even count),
    ``rmse_angle = sqrt(mean θ²)``, and ``within_11.25`` / ``within_22.5`` / ``within_30`` = the
    fraction of V with ``θ < 11.25°`` / ``22.5°`` / ``30°``.

    The median needs every angle; a dataset such as NYUD val has ~2·10⁸ of them, so by default
    (``median="histogram"``) they are binned in ``resolution_deg`` bins and the median is the
    centre of the bin holding the middle rank (error ≤ ``resolution_deg``/2; all other numbers are
    exact). ``median="exact"`` keeps every angle in memory.
    """

    THRESHOLDS = (11.25, 22.5, 30.0)

    def __init__(self, median: str = "histogram", resolution_deg: float = 0.01) -> None:
        if median not in ("histogram", "exact"):
            raise ConfigError(f"median must be 'histogram' or 'exact', got {median!r}")
        if resolution_deg <= 0:
            raise ConfigError(f"resolution_deg must be > 0, got {resolution_deg}")
        self.median_mode = median
        self.resolution = float(resolution_deg)
        self.n_bins = int(math.ceil(180.0 / self.resolution))
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.sum = self.sum_sq = 0.0
        self.within = [0] * len(self.THRESHOLDS)
        self.hist = torch.zeros(self.n_bins, dtype=torch.int64)
        self.angles: list[Tensor] = []

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        p, t = _vector_maps(pred, target)
        valid = t.norm(dim=1) > 0
        cos = (F.normalize(p.double(), dim=1, eps=1e-12) * F.normalize(t.double(), dim=1, eps=1e-12)).sum(dim=1)
        ang = torch.rad2deg(torch.acos(cos[valid].clamp(-1.0, 1.0)))
        self.n += int(ang.numel())
        self.sum += float(ang.sum())
        self.sum_sq += float((ang * ang).sum())
        for i, thr in enumerate(self.THRESHOLDS):
            self.within[i] += int((ang < thr).sum())
        if self.median_mode == "exact":
            self.angles.append(ang.cpu())
        else:
            idx = (ang / self.resolution).long().clamp_(0, self.n_bins - 1)
            self.hist += torch.bincount(idx, minlength=self.n_bins).cpu()

    def _median(self) -> float:
        if self.median_mode == "exact":
            return float(np.median(torch.cat(self.angles).numpy()))
        cum = self.hist.cumsum(0)
        lo, hi = (self.n - 1) // 2, self.n // 2  # the two middle ranks (equal for odd n)
        # The bin holding rank r (0-based) is the first whose cumulative count exceeds r.
        b = torch.searchsorted(cum, torch.tensor([lo, hi]), right=True)
        return float((b.double() + 0.5).mean()) * self.resolution

    def compute(self) -> dict[str, float]:
        """``{"mean_angle", "median_angle", "rmse_angle", "within_11.25", "within_22.5",
        "within_30", "n_valid"}``; NaN when no pixel is valid."""
        keys = [f"within_{t:g}" for t in self.THRESHOLDS]
        if self.n == 0:
            out = {k: float("nan") for k in ("mean_angle", "median_angle", "rmse_angle", *keys)}
            out["n_valid"] = 0
            return out
        out = {
            "mean_angle": self.sum / self.n,
            "median_angle": self._median(),
            "rmse_angle": math.sqrt(self.sum_sq / self.n),
        }
        out.update({k: c / self.n for k, c in zip(keys, self.within)})
        out["n_valid"] = self.n
        return out


# --------------------------------------------------------------------------------------------
# Edges


def _disc_max(x: Tensor, radius: float) -> Tensor:
    """Max of ``x`` (N, H, W) over a Euclidean disc of ``radius`` pixels around each pixel.

    The disc is split into rows: for each row offset ``dy`` a 1-D max-pool of half-width
    ``floor(sqrt(r² − dy²))``, shifted by ``dy``; that is 2⌊r⌋ + 1 pooling ops instead of one per
    disc pixel. Outside the image counts as −inf. ``radius < 1`` leaves ``x`` unchanged.
    """
    r_int = int(math.floor(radius + 1e-9))
    if r_int < 1:
        return x
    h = x.shape[1]
    x4 = x[:, None]
    out = torch.full_like(x, -math.inf)
    rows: dict[int, Tensor] = {}
    for dy in range(-r_int, r_int + 1):
        half = int(math.floor(math.sqrt(max(radius * radius - dy * dy, 0.0)) + 1e-9))
        if half not in rows:
            rows[half] = x if half == 0 else F.max_pool2d(x4, (1, 2 * half + 1), 1, (0, half))[:, 0]
        row = rows[half]
        # out[i] = max(out[i], row[i + dy]) where row i + dy exists.
        if dy >= 0:
            out[:, : h - dy] = torch.maximum(out[:, : h - dy], row[:, dy:])
        else:
            out[:, -dy:] = torch.maximum(out[:, -dy:], row[:, : h + dy])
    return out


class EdgeMeter:
    """Optimal-dataset-scale F-measure (odsF) of edge probability maps, with a match tolerance.

    For each threshold ``t`` of a fixed grid (default 99 values, ``t_k = k/100``, as the BSDS
    benchmark), the predicted edges are ``E_t = {p : prob_p ≥ t}``. With the tolerance radius
    ``r`` (``tolerance_px`` pixels, or ``max_dist`` × image diagonal, BSDS's 0.0075 by default):

    - a predicted pixel ``p ∈ E_t`` is a true positive iff some GT edge pixel lies within
      Euclidean distance ``r`` of ``p``;
    - a GT edge pixel ``g`` is recalled iff some pixel of ``E_t`` lies within ``r`` of ``g``.

    Counts are summed over the dataset per threshold: ``P_t = Σ TP_t / Σ |E_t|`` (0 if nothing is
    predicted), ``R_t = Σ recalled_t / Σ |GT|``, ``F_t = 2 P_t R_t / (P_t + R_t)``, and
    ``odsF = max_t F_t`` (no interpolation between grid points, unlike BSDS). ``oisF`` uses each
    image's best threshold: its counts at that threshold are summed over the dataset, then P, R, F.

    This is a *tolerance-based approximation* of BSDS's ``correspondPixels``, which matches
    predicted and GT pixels 1-to-1 (bipartite assignment) after thinning the prediction: here
    several predicted pixels may be justified by one GT pixel, and predictions are not thinned,
    so thick responses near a true edge are not penalised and the scores run higher than the
    official tool's. It is exact, fast and monotone in ``t``: a GT pixel is recalled at ``t`` iff
    the maximum probability within ``r`` of it is ≥ ``t``, so one disc max-filter per image serves
    all thresholds.

    ``update(prob, target)``: probabilities in [0, 1] (apply ``sigmoid`` to logits first) and
    targets in {0, 1} (≥ 0.5 counts as edge) with ``ignore_index`` pixels excluded from
    everything; shapes (N, 1, H, W), (N, H, W) or (H, W).
    """

    def __init__(
        self,
        thresholds: int | Iterable[float] = 99,
        max_dist: float = 0.0075,
        tolerance_px: float | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        if isinstance(thresholds, int):
            if thresholds < 1:
                raise ConfigError(f"need at least one threshold, got {thresholds}")
            thr = torch.linspace(1.0 / (thresholds + 1), 1.0 - 1.0 / (thresholds + 1), thresholds, dtype=torch.float64)
        else:
            thr = torch.tensor(sorted(float(v) for v in thresholds), dtype=torch.float64)
            if thr.numel() == 0:
                raise ConfigError("need at least one threshold")
        if tolerance_px is None and max_dist < 0 or tolerance_px is not None and tolerance_px < 0:
            raise ConfigError("the matching tolerance must be >= 0")
        self.thresholds = thr
        self.max_dist = max_dist
        self.tolerance_px = tolerance_px
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        k = self.thresholds.numel()
        self.n_pred = torch.zeros(k, dtype=torch.int64)
        self.tp_pred = torch.zeros(k, dtype=torch.int64)
        self.tp_gt = torch.zeros(k, dtype=torch.int64)
        self.n_gt = 0
        self.ois = torch.zeros(4, dtype=torch.int64)  # TP_pred, |E|, recalled, |GT| at best t
        self.n_images = 0

    def radius(self, height: int, width: int) -> float:
        """Tolerance in pixels for an image of this size."""
        if self.tolerance_px is not None:
            return float(self.tolerance_px)
        return self.max_dist * math.hypot(height, width)

    def _count_ge(self, values: Tensor) -> Tensor:
        """For every threshold t_k, how many of ``values`` are ≥ t_k."""
        k = self.thresholds.numel()
        # idx = number of thresholds ≤ v: the value counts for thresholds 0..idx-1.
        idx = torch.searchsorted(self.thresholds, values.double().cpu().contiguous(), right=True)
        hist = torch.bincount(idx, minlength=k + 1)
        return hist.flip(0).cumsum(0).flip(0)[1:]

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        p, t = _same_maps(pred, target)
        p = p.float()
        if p.numel() and (float(p.min()) < 0.0 or float(p.max()) > 1.0):
            raise DataError("edge predictions must be probabilities in [0, 1] (apply sigmoid to logits)")
        ignore = t == self.ignore_index
        gt = (t >= 0.5) & ~ignore
        p = torch.where(ignore, torch.full_like(p, -1.0), p)  # never predicted at any threshold
        r = self.radius(p.shape[1], p.shape[2])
        near_gt = _disc_max(gt.float(), r) > 0
        best_p = _disc_max(p, r)
        for i in range(p.shape[0]):
            keep = ~ignore[i]
            n_pred = self._count_ge(p[i][keep])
            tp_pred = self._count_ge(p[i][keep & near_gt[i]])
            tp_gt = self._count_ge(best_p[i][gt[i]])
            n_gt = int(gt[i].sum())
            self.n_pred += n_pred
            self.tp_pred += tp_pred
            self.tp_gt += tp_gt
            self.n_gt += n_gt
            f = self._f(tp_pred, n_pred, tp_gt, n_gt)[2]
            b = int(f.argmax())
            self.ois += torch.tensor([int(tp_pred[b]), int(n_pred[b]), int(tp_gt[b]), n_gt])
            self.n_images += 1

    @staticmethod
    def _f(tp_pred: Tensor, n_pred: Tensor, tp_gt: Tensor, n_gt: int | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        prec = tp_pred.double() / torch.as_tensor(n_pred).double().clamp_min(1)
        rec = tp_gt.double() / torch.as_tensor(n_gt).double().clamp_min(1)
        f = torch.where(prec + rec > 0, 2 * prec * rec / (prec + rec).clamp_min(1e-300), torch.zeros_like(prec))
        return prec, rec, f

    def compute(self) -> dict[str, float | list[float]]:
        """``{"odsF", "ods_threshold", "ods_precision", "ods_recall", "oisF", "precision",
        "recall", "f"}`` (the last three: per-threshold curves)."""
        prec, rec, f = self._f(self.tp_pred, self.n_pred, self.tp_gt, self.n_gt)
        b = int(f.argmax())
        o = self.ois
        ois = self._f(o[0:1], o[1:2], o[2:3], o[3:4])[2]
        return {
            "odsF": float(f[b]),
            "ods_threshold": float(self.thresholds[b]),
            "ods_precision": float(prec[b]),
            "ods_recall": float(rec[b]),
            "oisF": float(ois[0]),
            "precision": prec.tolist(),
            "recall": rec.tolist(),
            "f": f.tolist(),
        }


# --------------------------------------------------------------------------------------------
# Multi-task gain

#: Whether higher (+1) or lower (−1) is better, for the metric names produced above.
DEFAULT_DIRECTIONS: dict[str, int] = {
    "mIoU": +1,
    "pixel_acc": +1,
    "rmse": -1,
    "abs_rel": -1,
    "mae": -1,
    "log_rmse": -1,
    "delta1": +1,
    "mean_angle": -1,
    "median_angle": -1,
    "rmse_angle": -1,
    "within_11.25": +1,
    "within_22.5": +1,
    "within_30": +1,
    "odsF": +1,
    "oisF": +1,
}

_WORDS = {"higher": 1, "max": 1, "+": 1, "lower": -1, "min": -1, "-": -1}


def multi_task_gain(
    multi: Mapping[str, float],
    single: Mapping[str, float],
    directions: Mapping[str, int | str] | None = None,
    metrics: Iterable[str] | None = None,
) -> float:
    """Δm = (1/T) Σ_t s_t (M_t − M_single,t) / M_single,t, as a fraction (× 100 for %).

    ``multi`` and ``single`` map metric names to the multi-task and single-task values; ``T`` is
    the metrics in ``metrics`` (default: every key of ``multi``). ``s_t`` comes from
    ``directions`` (default :data:`DEFAULT_DIRECTIONS`): +1 / ``"higher"`` where higher is
    better (mIoU, odsF), −1 / ``"lower"`` where lower is better (RMSE, angle error). With one
    metric per task (the usual NYUD table: mIoU, rmse, mean_angle, odsF) this is the per-task Δm.
    """
    table = DEFAULT_DIRECTIONS if directions is None else directions
    names = list(multi) if metrics is None else list(metrics)
    if not names:
        raise ConfigError("multi_task_gain needs at least one metric")
    total = 0.0
    for name in names:
        if name not in multi or name not in single:
            raise ConfigError(f"metric {name!r} missing from the multi-task or single-task results")
        if name not in table:
            raise ConfigError(f"no direction (higher/lower is better) known for metric {name!r}")
        s = table[name]
        sign = _WORDS.get(s.lower()) if isinstance(s, str) else (1 if s > 0 else -1 if s < 0 else None)
        if sign is None:
            raise ConfigError(f"direction of {name!r} must be +1/-1 or 'higher'/'lower', got {s!r}")
        base = float(single[name])
        if base == 0.0 or not math.isfinite(base):
            raise ConfigError(f"single-task value of {name!r} is {base}; the relative gain is undefined")
        total += sign * (float(multi[name]) - base) / base
    return total / len(names)
