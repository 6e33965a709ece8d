"""Dense multi-task building blocks (NYUD-v2 style), independent of the FTN core.

- :mod:`ftn.dense.scenes` — procedural indoor scenes with exact semseg/depth/normals/edge labels,
  written in the NYUD multi-task folder layout;
- :mod:`ftn.dense.nyud` — the NYUD multi-task dataset and joint augmentations;
- :mod:`ftn.dense.metrics` — losses, dataset-level metrics (mIoU, RMSE, angle errors, odsF) and
  the multi-task gain Δm;
- :mod:`ftn.dense.deeplab` — DeepLabv3+ heads and a stride-4/stride-16 encoder wrapper.
"""

from .deeplab import DeepLabV3Plus, DeepLabV3PlusHead, MultiScaleEncoder, aspp_rates
from .metrics import (
    DEFAULT_DIRECTIONS,
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
from .nyud import (
    TASKS,
    JointCompose,
    NYUDMultiTask,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    Resize,
)
from .scenes import CLASS_NAMES, IGNORE_INDEX, generate_scene, render_scene, sample_scene, write_nyud_layout

__all__ = [
    "CLASS_NAMES",
    "IGNORE_INDEX",
    "TASKS",
    "generate_scene",
    "render_scene",
    "sample_scene",
    "write_nyud_layout",
    "NYUDMultiTask",
    "JointCompose",
    "RandomScale",
    "RandomCrop",
    "RandomHorizontalFlip",
    "Resize",
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
    "DeepLabV3PlusHead",
    "MultiScaleEncoder",
    "DeepLabV3Plus",
    "aspp_rates",
]
