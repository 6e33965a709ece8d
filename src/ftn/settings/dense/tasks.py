"""The dense tasks, one record each: everything the dense setting, its data, the demo and
``ftn predict`` need to know about a task.

A :class:`DenseTask` says where the task's labels lie in the NYUD layout and how they are read,
how augmentation treats them, how many channels its head predicts (and what it applies to
them), its loss and loss weight, its meter, the metrics kept and which way each is better, the
demo table's columns and how its maps are drawn (demo picture, ``ftn predict`` PNG). The
registry :data:`DENSE_TASKS` (name → record, in registration order) is what
:mod:`~ftn.settings.dense.nyud`, :mod:`~ftn.settings.dense.model`,
:mod:`~ftn.settings.dense.setting`, :mod:`~ftn.settings.dense.demo` and ``ftn predict`` read; the
four NYUD-v2 tasks are registered below, and a new task is one more
:func:`register_dense_task` call (the order of registration is the order of the default
``data.tasks`` and of the decoders' seeds).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ...core.errors import ConfigError, DataError
from .metrics import (
    DepthMeter,
    EdgeMeter,
    NormalsMeter,
    SegmentationMeter,
    depth_loss,
    edge_loss,
    normals_loss,
    semseg_loss,
)
from .metrics.common import IGNORE_INDEX

__all__ = ["DenseTask", "TableColumn", "DENSE_TASKS", "TASKS", "register_dense_task", "unregister_dense_task",
           "dense_task", "dense_task_names", "main_metrics", "prediction_image", "read_npy", "read_map",
           "NORMALS_STATS_RESOLUTION"]

#: Bin width (degrees) of the per-image normals histograms ``ftn sweep`` keeps: the median angle
#: recomputed from them is within 0.25° of the exact one (the other metrics exact).
NORMALS_STATS_RESOLUTION = 0.5

# Keys of a sample dict and the joint training task's name: no dense task may take them.
_RESERVED = ("image", "meta", "all")


class TableColumn(NamedTuple):
    """One column of the demo table: ``<task> <header>``, the metric times ``scale``, printed
    with ``digits`` decimals."""

    header: str
    metric: str
    scale: float = 1.0
    digits: int = 2


@dataclass(frozen=True, kw_only=True)
class DenseTask:
    """One dense task. Functions named here should be module-level (not lambdas) where a model
    holds them (``activation``), so that models stay picklable."""

    name: str
    # Labels: ``root/<folder>/<id><suffix>``; ``read(path, dataset)`` returns the label tensor,
    # (H, W) or (C, H, W), raising DataError naming the file when it is unreadable or malformed.
    # ``dataset`` is the NYUDMultiTask reading it (e.g. its ``zero_is_void``).
    folder: str
    suffix: str
    read: Callable[[Path, Any], Tensor]
    # Augmentation: the value padding takes (marks "no information"); a resize is nearest unless
    # the transform asks for a smooth one and ``smooth_resize(label, size)`` is given; ``mirror``
    # fixes up a label after its pixels were flipped left-right (normals: negate x).
    pad_value: float = 0.0
    smooth_resize: Callable[[Tensor, tuple[int, int]], Tensor] | None = None
    mirror: Callable[[Tensor], Tensor] | None = None
    # Head: one output channel per name in ``labels`` (None: one per class, named by the class
    # names); ``activation`` is applied to the decoder's output inside the head.
    labels: tuple[str, ...] | None = None
    activation: Callable[[Tensor], Tensor] | None = None
    # Training and evaluation. ``loss(head output, target, data config)`` is unweighted; the
    # same ``loss_weight`` multiplies it in every method (the default of ``data.loss_weights``).
    loss: Callable[[Tensor, Tensor, Any], Tensor]
    loss_weight: float = 1.0
    meter: Callable[[int, Any], Any]  # (number of classes, data config) → a meter (update / compute)
    reported: tuple[str, ...]  # metrics kept in results (curves and per-class lists are dropped)
    main: str  # the headline metric, the one Δm averages over
    directions: Mapping[str, int]  # +1: higher is better, −1: lower (``main`` at least)
    probabilities: bool = False  # the meter wants sigmoid(output), not logits
    # The meter whose per-image statistics ``ftn sweep`` keeps (None: ``meter``); the normals
    # meter's 0.01° median histogram would be 18,000 columns per image, so it keeps 0.5° bins.
    stats_meter: Callable[[int, Any], Any] | None = None
    # Showing: the demo table's columns, the demo picture (``show(map, is_prediction, truth)`` →
    # (array, imshow keyword arguments); truth in label format, the map either) and the PNG
    # ``ftn predict`` writes for a prediction (C, H, W).
    table: tuple[TableColumn, ...] = ()
    show: Callable[[Tensor, bool, Tensor], tuple[Any, dict[str, Any]]] | None = None
    image: Callable[[Tensor], Image.Image] | None = None

    def channels(self, num_classes: int) -> int:
        """Output channels of the task's head."""
        return num_classes if self.labels is None else len(self.labels)

    def output_labels(self, class_names: Sequence[str] | None, num_classes: int) -> list[str]:
        """A name per output channel (for the adapter file's info)."""
        if self.labels is not None:
            return list(self.labels)
        if class_names and len(class_names) == num_classes:
            return list(class_names)
        return [f"class {i}" for i in range(num_classes)]


#: Every dense task, by name, in registration order.
DENSE_TASKS: dict[str, DenseTask] = {}


def register_dense_task(task: DenseTask, replace: bool = False) -> DenseTask:
    """Add ``task`` to :data:`DENSE_TASKS` (``replace=True``: overwrite one of the same name,
    keeping its place). Returns the task. Spawned processes (``ftn demo``'s workers) start from
    a fresh import, so register from a module they import too."""
    if task.name in _RESERVED or not task.name or "/" in task.name:
        raise ConfigError(f"{task.name!r} cannot name a dense task (reserved: {list(_RESERVED)}, no '/')")
    if task.name in DENSE_TASKS and not replace:
        raise ConfigError(f"dense task {task.name!r} is already registered")
    if task.main not in task.reported:
        raise ConfigError(f"dense task {task.name!r}: its main metric {task.main!r} is not among {task.reported}")
    if task.main not in task.directions:
        raise ConfigError(f"dense task {task.name!r}: no direction (higher/lower is better) for {task.main!r}")
    DENSE_TASKS[task.name] = task
    return task


def unregister_dense_task(name: str) -> DenseTask:
    """Remove a task from :data:`DENSE_TASKS`; returns its record."""
    return DENSE_TASKS.pop(dense_task(name).name)


def dense_task(name: str) -> DenseTask:
    """The record of a registered task (ConfigError naming the known ones otherwise)."""
    try:
        return DENSE_TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown dense task {name!r}; known: {list(DENSE_TASKS)}") from None


def dense_task_names() -> tuple[str, ...]:
    """The registered tasks, in registration order."""
    return tuple(DENSE_TASKS)


def main_metrics() -> dict[str, str]:
    """Each registered task's headline metric (the usual NYUD table; Δm averages over these)."""
    return {name: task.main for name, task in DENSE_TASKS.items()}


# --------------------------------------------------------------------------------------------
# Reading labels


def read_npy(path: Path) -> np.ndarray:
    """A ``.npy`` array (DataError naming the file when it cannot be read)."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read array ({e})") from e


def read_map(path: Path, what: str) -> np.ndarray:
    """A ``.npy`` H×W map; a trailing singleton axis (some NYUD exports carry one) is dropped."""
    arr = np.squeeze(read_npy(path))
    if arr.ndim != 2:
        raise DataError(f"{path}: {what} must be H×W, got shape {arr.shape}")
    return arr


def _read_semseg(path: Path, dataset: Any) -> Tensor:
    """uint8 label PNG → long (H, W); real NYUD's 0 = void becomes 255 and its classes 0..39."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"{path}: cannot read label image ({e})") from e
    if arr.ndim != 2:
        raise DataError(f"{path}: label image must be single-channel, got shape {arr.shape}")
    lab = arr.astype(np.int64)
    if dataset.zero_is_void:
        lab = np.where(lab == 0, IGNORE_INDEX, lab - 1)
    return torch.from_numpy(lab)


def _read_depth(path: Path, dataset: Any) -> Tensor:
    """Metres, float (1, H, W); NaN/negative holes become 0 = invalid."""
    d = read_map(path, "depth").astype(np.float32)
    d[~np.isfinite(d) | (d < 0)] = 0.0
    return torch.from_numpy(d)[None]


def _read_normals(path: Path, dataset: Any) -> Tensor:
    """H×W×3 in [-1, 1] → float (3, H, W); NaN → 0 = invalid."""
    arr = read_npy(path)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DataError(f"{path}: normals must be H×W×3, got shape {arr.shape}")
    n = np.nan_to_num(arr.astype(np.float32))
    return torch.from_numpy(np.ascontiguousarray(n.transpose(2, 0, 1)))


def _read_edge(path: Path, dataset: Any) -> Tensor:
    """{0, 1} → float (1, H, W)."""
    return torch.from_numpy(read_map(path, "edge").astype(np.float32))[None]


# --------------------------------------------------------------------------------------------
# Normals under augmentation and in the head


def _unit_normals(out: Tensor) -> Tensor:
    # The losses and metrics normalise again, harmlessly.
    return F.normalize(out, dim=1, eps=1e-12)


def _resize_normals(x: Tensor, size: tuple[int, int]) -> Tensor:
    n = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
    norm = n.norm(dim=0, keepdim=True)
    # Averaging unit vectors shortens them; renormalise, and keep "invalid" (0) where the
    # interpolated vector all but vanished (mostly invalid neighbours).
    return torch.where(norm > 0.5, n / norm.clamp_min(1e-12), torch.zeros_like(n))


def _mirror_normals(n: Tensor) -> Tensor:
    # Normals are in a camera frame whose x axis points right: mirroring negates x.
    n = n.clone()
    n[0] = -n[0]
    return n


# --------------------------------------------------------------------------------------------
# Pictures: the demo's grid (array + imshow arguments) and ``ftn predict``'s PNGs


def _show_semseg(x: Tensor, is_pred: bool, truth: Tensor) -> tuple[Any, dict[str, Any]]:
    lab = x.argmax(0) if is_pred else x
    lab = lab.numpy().astype(float)
    lab[lab == 255] = np.nan
    return lab, {"cmap": "tab10", "vmin": 0, "vmax": 9, "interpolation": "nearest"}


def _show_depth(x: Tensor, is_pred: bool, truth: Tensor) -> tuple[Any, dict[str, Any]]:
    d = x.reshape(x.shape[-2:]).numpy().astype(float)
    if not is_pred:
        d[d <= 0] = np.nan
    return d, {"cmap": "viridis", "vmin": 0.0, "vmax": float(truth.max())}  # one scale per scene: the truth's


def _show_normals(x: Tensor, is_pred: bool, truth: Tensor) -> tuple[Any, dict[str, Any]]:
    n = x.float()
    if is_pred:
        n = torch.nn.functional.normalize(n, dim=0)
    valid = n.norm(dim=0, keepdim=True) > 0
    rgb = torch.where(valid, (n + 1) / 2, torch.ones_like(n))
    return rgb.permute(1, 2, 0).clamp(0, 1).numpy(), {}


def _show_edge(x: Tensor, is_pred: bool, truth: Tensor) -> tuple[Any, dict[str, Any]]:
    e = torch.sigmoid(x) if is_pred else x.clone()
    e = e.reshape(e.shape[-2:]).numpy().astype(float)
    e[e > 1] = np.nan
    return e, {"cmap": "gray_r", "vmin": 0, "vmax": 1, "interpolation": "nearest"}


_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _semseg_image(p: Tensor) -> Image.Image:
    """Classes as a palette image."""
    classes = p.argmax(0).numpy().astype(np.uint8)
    palette = [c for i in range(256) for c in _PALETTE[i % len(_PALETTE)]]
    img = Image.fromarray(classes, mode="P")
    img.putpalette(palette)
    return img


def _normals_image(p: Tensor) -> Image.Image:
    """RGB = (n + 1) / 2."""
    return Image.fromarray(((p.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy(), mode="RGB")


def _gray(m: Tensor) -> Image.Image:
    return Image.fromarray((m.clamp(0, 1) * 255).round().byte().numpy(), mode="L")


def _depth_image(p: Tensor) -> Image.Image:
    """Grayscale, near = bright, scaled to the image's range."""
    m = p[0]
    lo, hi = float(m.min()), float(m.max())
    return _gray(1 - (m - lo) / (hi - lo) if hi > lo and math.isfinite(hi - lo) else torch.zeros_like(m))


def _edge_image(p: Tensor) -> Image.Image:
    """The sigmoid probability as grayscale."""
    return _gray(torch.sigmoid(p[0]))


def prediction_image(task: str, prediction: Tensor) -> Image.Image:
    """The PNG image of one dense prediction (C, H, W) of ``task``: the task's own picture, or,
    for a task this installation does not know (an adapter without info names none), by its
    channels: more than 3 (and no task name) are classes, 3 a normal map, else a depth-like map."""
    p = prediction.detach().float().cpu()
    known = DENSE_TASKS.get(task)
    if known is not None and known.image is not None:
        return known.image(p)
    if not task and p.shape[0] > 3:
        return _semseg_image(p)
    if p.shape[0] == 3:
        return _normals_image(p)
    return _depth_image(p)


# --------------------------------------------------------------------------------------------
# The four NYUD-v2 tasks (Multi-Task-Learning-PyTorch's NYUD loss weights: 1, 1, 10, 50)

register_dense_task(DenseTask(
    name="semseg", folder="segmentation", suffix=".png", read=_read_semseg, pad_value=float(IGNORE_INDEX),
    loss=lambda p, t, d: semseg_loss(p, t), meter=lambda c, d: SegmentationMeter(c),
    reported=("mIoU", "pixel_acc"), main="mIoU", directions=SegmentationMeter.DIRECTIONS,
    table=(TableColumn("mIoU ↑", "mIoU", 100), TableColumn("pix. acc ↑", "pixel_acc", 100)),
    show=_show_semseg, image=_semseg_image))
register_dense_task(DenseTask(
    name="depth", folder="depth", suffix=".npy", read=_read_depth, labels=("depth (m)",),
    loss=lambda p, t, d: depth_loss(p, t), meter=lambda c, d: DepthMeter(),
    reported=("rmse", "abs_rel"), main="rmse", directions=DepthMeter.DIRECTIONS,
    table=(TableColumn("RMSE ↓", "rmse", 1, 3), TableColumn("abs rel ↓", "abs_rel", 1, 3)),
    show=_show_depth, image=_depth_image))
register_dense_task(DenseTask(
    name="normals", folder="normals", suffix=".npy", read=_read_normals, smooth_resize=_resize_normals,
    mirror=_mirror_normals, labels=("normal x", "normal y", "normal z"), activation=_unit_normals,
    loss=lambda p, t, d: normals_loss(p, t, kind=d.normals_loss), loss_weight=10.0,
    meter=lambda c, d: NormalsMeter(),
    reported=("mean_angle", "median_angle", "within_11.25", "within_22.5", "within_30"), main="mean_angle",
    directions=NormalsMeter.DIRECTIONS,
    stats_meter=lambda c, d: NormalsMeter(resolution_deg=NORMALS_STATS_RESOLUTION),
    table=(TableColumn("mean° ↓", "mean_angle"), TableColumn("median° ↓", "median_angle"),
           TableColumn("<11.25° ↑", "within_11.25", 100), TableColumn("<22.5° ↑", "within_22.5", 100),
           TableColumn("<30° ↑", "within_30", 100)),
    show=_show_normals, image=_normals_image))
register_dense_task(DenseTask(
    name="edge", folder="edge", suffix=".npy", read=_read_edge, pad_value=float(IGNORE_INDEX),
    labels=("edge logit",),
    loss=lambda p, t, d: edge_loss(p, t, pos_weight=d.edge_pos_weight), loss_weight=50.0,
    meter=lambda c, d: EdgeMeter(d.edge_thresholds, d.edge_max_dist, d.edge_tolerance_px, nms=d.edge_nms),
    reported=("odsF", "oisF", "ods_threshold"), main="odsF", directions=EdgeMeter.DIRECTIONS,
    probabilities=True, table=(TableColumn("odsF ↑", "odsF", 100),), show=_show_edge, image=_edge_image))

#: The NYUD-v2 tasks built in above (every registered one: :func:`dense_task_names`).
TASKS: tuple[str, ...] = dense_task_names()
