"""Losses and dataset-level metrics for the dense tasks, and the multi-task gain Δm.

One module per task — :mod:`.segmentation` (cross-entropy; mIoU, pixel accuracy), :mod:`.depth`
(masked L1; RMSE, relative error), :mod:`.normals` (L1/cosine; angle errors), :mod:`.edges`
(balanced BCE; the BSDS benchmark's odsF/oisF) — plus :mod:`.common` (ignore label, shapes)
and :mod:`.gain` (Δm).

Conventions follow Multi-Task-Learning-PyTorch / RCM (see ``docs/research-notes.md`` §2):
semantic labels use 255 as "ignore"; depth 0 and all-zero normals mark invalid pixels; edge
targets are {0, 1} with 255 = ignore (padding added by augmentation).

Every metric is an accumulator: ``update(pred, target)`` for each batch, ``compute()`` once for
the whole dataset, ``reset()`` to start again. Statistics are *pooled over all pixels of the
dataset* (never a mean of per-image values), as the reference evaluation code does. Ratios are
returned as fractions in [0, 1] (multiply by 100 for the usual tables); angles in degrees.
Accumulators keep their sums on the CPU in float64/int64, so long evaluations do not lose
precision, and accept tensors on any device.

Per-image statistics: every meter's ``image_stats(pred, target)`` returns one row per image
(``stats_width()`` columns) whose column sums are exactly what ``update`` adds to the meter (it
is implemented through them), and ``from_stats(total)`` gives ``compute()``'s result for the
images whose rows sum to ``total``. So a bootstrap can resample images and recompute the
dataset-level metrics (``ftn sweep``'s paired intervals).
"""

from .common import IGNORE_INDEX
from .depth import DepthMeter, depth_loss
from .edges import EdgeMeter, correspond_counts, edge_loss, edge_nms, thin_edges
from .gain import DEFAULT_DIRECTIONS, multi_task_gain
from .normals import NormalsMeter, normals_loss
from .segmentation import SegmentationMeter, semseg_loss

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
    "edge_nms",
    "thin_edges",
    "correspond_counts",
    "DEFAULT_DIRECTIONS",
    "multi_task_gain",
]
