"""Depth: the masked L1 loss and the meter of depth errors (RMSE, relative error, δ < 1.25)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .common import same_maps

__all__ = ["depth_loss", "DepthMeter"]


def depth_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Masked L1: ``L = (1/|V|) Σ_{p∈V} |d_p − d*_p|`` with ``V = {p : d*_p > 0}``.

    Shapes (N, 1, H, W), (N, H, W) or (H, W), equal for both. 0 when no pixel is valid.
    """
    p, t = same_maps(pred, target)
    valid = t > 0
    # At least 1: an all-invalid batch gives 0 (every term is masked), still in the graph, and
    # no count is read back to the host.
    n = valid.sum().clamp_min(1)
    return ((p - t).abs() * valid).sum() / n



class DepthMeter:
    """Depth errors pooled over all valid pixels ``V = {p : d*_p > 0}`` of the dataset.

    - ``rmse = sqrt(Σ_V (d − d*)² / |V|)`` — pooled, *not* the mean of per-image RMSEs (the two
      differ whenever images have different numbers of valid pixels or errors);
    - ``abs_rel = (1/|V|) Σ_V |d − d*| / d*``; ``mae = (1/|V|) Σ_V |d − d*|``;
    - ``log_rmse = sqrt(Σ_V (log d − log d*)² / |V|)``, predictions clamped to ≥ 1e-9 first;
    - ``delta1`` = fraction of V with ``max(d/d*, d*/d) < 1.25``.

    ``update(pred, target)``: equal shapes (N, 1, H, W), (N, H, W) or (H, W). NaN when V is empty.
    """

    #: Whether higher (+1) or lower (−1) is better, per metric of :meth:`compute`.
    DIRECTIONS = {"rmse": -1, "abs_rel": -1, "mae": -1, "log_rmse": -1, "delta1": +1}

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.sq = self.abs = self.rel = self.log_sq = 0.0
        self.delta1 = 0

    #: Columns of :meth:`image_stats`.
    STATS = ("n", "sq", "abs", "rel", "log_sq", "delta1")

    def stats_width(self) -> int:
        return len(self.STATS)

    @torch.no_grad()
    def image_stats(self, pred: Tensor, target: Tensor) -> np.ndarray:
        """Per image (float64, N × 6): valid pixels, Σ err², Σ |err|, Σ |err|/d*, Σ (log d − log d*)²
        and the count with ``max(d/d*, d*/d) < 1.25``, over the image's valid pixels."""
        p, t = same_maps(pred, target)
        p, t = p.double(), t.double()
        valid = (t > 0) & torch.isfinite(t)
        one = torch.ones((), dtype=torch.float64, device=t.device)
        t = torch.where(valid, t, one)  # invalid pixels: prediction = target = 1, no error
        p = torch.where(valid, p, one)
        err = p - t
        pc = p.clamp_min(1e-9)
        dims = (1, 2)
        rows = torch.stack([valid.sum(dims).double(), (err * err).sum(dims), err.abs().sum(dims),
                            (err.abs() / t).sum(dims), ((pc.log() - t.log()) ** 2).sum(dims),
                            ((torch.maximum(pc / t, t / pc) < 1.25) & valid).sum(dims).double()], dim=1)
        return rows.cpu().numpy()

    def update(self, pred: Tensor, target: Tensor) -> None:
        self._add(self.image_stats(pred, target).sum(0))

    def _add(self, total: np.ndarray) -> None:
        self.n += int(round(float(total[0])))
        self.sq += float(total[1])
        self.abs += float(total[2])
        self.rel += float(total[3])
        self.log_sq += float(total[4])
        self.delta1 += int(round(float(total[5])))

    def from_stats(self, total: np.ndarray) -> dict[str, float]:
        """:meth:`compute` of the images whose :meth:`image_stats` rows sum to ``total``."""
        meter = DepthMeter()
        meter._add(np.asarray(total, dtype=np.float64))
        return meter.compute()

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
