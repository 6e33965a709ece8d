"""Semantic segmentation: the cross-entropy loss and the confusion-matrix meter (mIoU, pixel
accuracy)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ....core.errors import ConfigError, DataError, ShapeError
from .common import IGNORE_INDEX, map_shape

__all__ = ["semseg_loss", "SegmentationMeter"]


def semseg_loss(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Cross-entropy averaged over labelled pixels.

    ``L = (1/|V|) Σ_{p∈V} −log softmax(z_p)[y_p]`` with ``V = {p : y_p ≠ ignore_index}``;
    ``logits`` (N, C, H, W), ``target`` (N, H, W) long. 0 when no pixel is labelled.
    """
    if logits.dim() != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ShapeError(f"expected logits (N, C, H, W) and target (N, H, W), got {tuple(logits.shape)} and {tuple(target.shape)}")
    # Summed, then divided by the labelled count (at least 1): the mean where pixels are labelled,
    # 0 (still in the graph) where none is, without reading the count back to the host.
    total = F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction="sum")
    return total / (target != ignore_index).sum().clamp_min(1)



class SegmentationMeter:
    """Confusion-matrix accumulator for mIoU and pixel accuracy.

    ``cm[i, j]`` counts labelled pixels of true class ``i`` predicted as ``j`` (pixels whose
    target is ``ignore_index`` are skipped). Per class: ``IoU_c = TP/(TP + FP + FN)`` with
    ``TP = cm[c, c]``, ``FP = Σ_i cm[i, c] − TP``, ``FN = Σ_j cm[c, j] − TP``.

    ``average="all"`` (default, the reference convention): ``mIoU`` is the mean over all
    ``num_classes`` of the IoUs computed from the dataset-level confusion matrix, as the NYUD
    multi-task evaluation (Multi-Task-Learning-PyTorch / ASTMT ``eval_semseg``:
    ``mean(tp / max(tp + fp + fn, 1e-8))``). A class that occurs in the truth but is never
    predicted scores 0; a class absent from both truth and prediction also counts as 0 (the
    reference's ``0 / eps``) — on NYUD-40 every class occurs in the 654 test images, so this case
    does not arise there. ``average="present"``: the mean over the classes that occur in the
    truth *or* the prediction (TP + FP + FN > 0) only. The two agree whenever every class occurs.
    In ``iou`` a class absent from both is NaN (undefined) under either convention.
    ``pixel_acc = Σ_c TP_c / Σ cm``.

    ``update(pred, target)``: ``pred`` is logits/scores (N, C, H, W) (argmax over C) or labels
    (N, H, W); ``target`` labels (N, H, W). Single images without N are accepted too.
    """

    #: Whether higher (+1) or lower (−1) is better, per metric of :meth:`compute`.
    DIRECTIONS = {"mIoU": +1, "pixel_acc": +1}

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, average: str = "all") -> None:
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

    def stats_width(self) -> int:
        return self.num_classes * self.num_classes

    @torch.no_grad()
    def image_stats(self, pred: Tensor, target: Tensor) -> np.ndarray:
        """Each image's confusion matrix, flattened: an int64 array (N, C²)."""
        t = map_shape(target, "target")
        p, c = pred, self.num_classes
        # Scores carry a class axis of length C: (N, C, H, W), or (C, H, W) for one image.
        if p.dim() == 4 and p.shape[1] == c and c > 1:
            p = p.argmax(dim=1)
        elif p.dim() == 3 and target.dim() == 2 and p.shape[0] == c:
            p = p.argmax(dim=0)
        p = map_shape(p, "prediction")
        if p.shape != t.shape:
            raise ShapeError(f"prediction {tuple(pred.shape)} does not match target {tuple(target.shape)}")
        t = t.long()
        n = t.shape[0]
        valid = t != self.ignore_index
        image = torch.arange(n, device=t.device).view(n, 1, 1).expand_as(t)[valid]
        t, p = t[valid], p[valid].long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= c):
            raise DataError(f"target label outside 0..{c - 1} (and not {self.ignore_index}): {int(t.max())}")
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= c):
            raise DataError(f"predicted label outside 0..{c - 1}")
        return torch.bincount((image * c + t) * c + p, minlength=n * c * c).reshape(n, c * c).cpu().numpy()

    def update(self, pred: Tensor, target: Tensor) -> None:
        c = self.num_classes
        self.confusion += torch.from_numpy(self.image_stats(pred, target).sum(0)).reshape(c, c)

    def from_stats(self, total: np.ndarray) -> dict[str, float | list[float]]:
        """:meth:`compute` of the images whose :meth:`image_stats` rows sum to ``total``."""
        meter = SegmentationMeter(self.num_classes, self.ignore_index, self.average)
        meter.confusion = torch.from_numpy(np.rint(np.asarray(total, dtype=np.float64)).astype(np.int64)).reshape(
            self.num_classes, self.num_classes)
        return meter.compute()

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
