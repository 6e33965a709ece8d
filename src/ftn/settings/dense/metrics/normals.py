"""Surface normals: the L1 / cosine loss on normalised vectors and the meter of angular errors
(mean, median, RMSE and the fractions within 11.25°, 22.5° and 30°)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ....core.errors import ConfigError
from .common import vector_maps

__all__ = ["normals_loss", "NormalsMeter"]


def normals_loss(pred: Tensor, target: Tensor, kind: str = "l1") -> Tensor:
    """Loss on L2-normalised predicted normals over valid pixels ``V = {p : ‖n*_p‖ > 0}``.

    - ``kind="l1"`` (default, Multi-Task-Learning-PyTorch's ``NormalsLoss(normalize=True)``):
      ``L = (1/(3|V|)) Σ_{p∈V} Σ_{c=1..3} |n̂_pc − n*_pc|``, a mean over valid *elements*.
    - ``kind="cosine"``: ``L = (1/|V|) Σ_{p∈V} (1 − n̂_p · n*_p/‖n*_p‖)``.

    ``n̂ = pred/‖pred‖``. Shapes (N, 3, H, W) or (3, H, W). 0 when no pixel is valid.
    """
    if kind not in ("l1", "cosine"):
        raise ConfigError(f"normals loss kind must be 'l1' or 'cosine', got {kind!r}")
    p, t = vector_maps(pred, target)
    valid = t.norm(dim=1) > 0  # (N, H, W)
    # At least 1: an all-invalid batch gives 0 (every term is masked), still in the graph, and
    # no count is read back to the host.
    n = valid.sum().clamp_min(1)
    p = F.normalize(p, dim=1, eps=1e-12)
    if kind == "l1":
        return ((p - t).abs().sum(dim=1) * valid).sum() / (3 * n)
    cos = (p * F.normalize(t, dim=1, eps=1e-12)).sum(dim=1)
    return ((1.0 - cos) * valid).sum() / n



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
    #: Whether higher (+1) or lower (−1) is better, per metric of :meth:`compute`.
    DIRECTIONS = {"mean_angle": -1, "median_angle": -1, "rmse_angle": -1,
                  **{f"within_{t:g}": +1 for t in THRESHOLDS}}

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

    def stats_width(self) -> int:
        return 3 + len(self.THRESHOLDS) + (self.n_bins if self.median_mode == "histogram" else 0)

    @torch.no_grad()
    def _angles(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Angles (N, H, W) in degrees and the valid mask."""
        p, t = vector_maps(pred, target)
        valid = t.norm(dim=1) > 0
        cos = (F.normalize(p.double(), dim=1, eps=1e-12) * F.normalize(t.double(), dim=1, eps=1e-12)).sum(dim=1)
        return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0))), valid

    def _stats(self, ang: Tensor, valid: Tensor) -> np.ndarray:
        n = ang.shape[0]
        a = torch.where(valid, ang, torch.zeros((), dtype=ang.dtype, device=ang.device))
        dims = (1, 2)
        cols = [valid.sum(dims).double(), a.sum(dims), (a * a).sum(dims)]
        cols += [((ang < thr) & valid).sum(dims).double() for thr in self.THRESHOLDS]
        rows = torch.stack(cols, dim=1).cpu().numpy()
        if self.median_mode == "exact":
            return rows
        image = torch.arange(n, device=ang.device).view(n, 1, 1).expand_as(ang)[valid]
        idx = (ang[valid] / self.resolution).long().clamp_(0, self.n_bins - 1)
        hist = torch.bincount(image * self.n_bins + idx, minlength=n * self.n_bins).reshape(n, self.n_bins)
        return np.concatenate([rows, hist.double().cpu().numpy()], axis=1)

    def image_stats(self, pred: Tensor, target: Tensor) -> np.ndarray:
        """Per image (float64): valid pixels, Σ θ, Σ θ², the count under each threshold and, with
        ``median="histogram"``, the image's histogram of θ in ``resolution_deg`` bins (the
        median of the summed histogram is the meter's). ``median="exact"`` has no histogram
        columns: :meth:`from_stats` then gives NaN for the median."""
        return self._stats(*self._angles(pred, target))

    def update(self, pred: Tensor, target: Tensor) -> None:
        ang, valid = self._angles(pred, target)
        self._add(self._stats(ang, valid).sum(0))
        if self.median_mode == "exact":
            self.angles.append(ang[valid].cpu())

    def _add(self, total: np.ndarray) -> None:
        k = len(self.THRESHOLDS)
        self.n += int(round(float(total[0])))
        self.sum += float(total[1])
        self.sum_sq += float(total[2])
        for i in range(k):
            self.within[i] += int(round(float(total[3 + i])))
        if self.median_mode == "histogram":
            self.hist += torch.from_numpy(np.rint(total[3 + k:]).astype(np.int64))

    def from_stats(self, total: np.ndarray) -> dict[str, float]:
        """:meth:`compute` of the images whose :meth:`image_stats` rows sum to ``total``."""
        meter = NormalsMeter("histogram", self.resolution)
        if self.median_mode == "exact":
            meter.median_mode = "unknown"  # no histogram in the statistics: the median is NaN
        meter._add(np.asarray(total, dtype=np.float64))
        return meter.compute()

    def _median(self) -> float:
        if self.median_mode == "unknown":
            return float("nan")
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
