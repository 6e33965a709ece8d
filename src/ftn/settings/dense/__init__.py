"""Dense multi-task building blocks (NYUD-v2 style), independent of the FTN core.

- :mod:`ftn.settings.dense.tasks` — one record per dense task (labels, head channels, loss, meter,
  metrics and their direction, table columns, pictures) and the registry every module reads;
- :mod:`ftn.settings.dense.scenes` — procedural indoor scenes with exact semseg/depth/normals/edge labels,
  written in the NYUD multi-task folder layout;
- :mod:`ftn.settings.dense.nyud` — the NYUD multi-task dataset and joint augmentations;
- :mod:`ftn.settings.dense.metrics` — losses and dataset-level metrics, one module per task (mIoU, RMSE,
  angle errors, odsF), and the multi-task gain Δm;
- :mod:`ftn.settings.dense.deeplab` — DeepLabv3+ heads and a stride-4/stride-16 encoder wrapper;
- :mod:`ftn.settings.dense.model` — the two-scale encoder and the per-task decoders methods train;
- :mod:`ftn.settings.dense.setting` — the dense setting of the training engine (``setting: dense``: data,
  heads, weighted losses, metrics, Δm); ``configs/nyud_resnet18_r30.yaml`` is the paper's setup;
- :mod:`ftn.settings.dense.demo` — ``ftn demo --dense`` on the embedded scenes.
"""

from .deeplab import DeepLabV3PlusHead, MultiScaleEncoder, aspp_rates
from .demo import format_dense_table, run_dense_demo
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
from .model import DenseEncoder, DenseHead, DenseHeads, build_encoder, build_head
from .nyud import (
    JointCompose,
    NYUDMultiTask,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    Resize,
)
from .scenes import CLASS_NAMES, IGNORE_INDEX, generate_scene, render_scene, sample_scene, write_nyud_layout
from .setting import DenseSetting, compare
from .tasks import (
    DENSE_TASKS,
    TASKS,
    DenseTask,
    TableColumn,
    dense_task,
    dense_task_names,
    register_dense_task,
    unregister_dense_task,
)

__all__ = [
    "CLASS_NAMES",
    "IGNORE_INDEX",
    "TASKS",
    "DenseTask",
    "TableColumn",
    "DENSE_TASKS",
    "register_dense_task",
    "unregister_dense_task",
    "dense_task",
    "dense_task_names",
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
    "aspp_rates",
    "DenseEncoder",
    "DenseHead",
    "DenseHeads",
    "build_encoder",
    "build_head",
    "DenseSetting",
    "compare",
    "run_dense_demo",
    "format_dense_table",
]
