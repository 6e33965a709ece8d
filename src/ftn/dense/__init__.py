"""Dense multi-task building blocks (NYUD-v2 style), independent of the FTN core.

- :mod:`ftn.dense.scenes` — procedural indoor scenes with exact semseg/depth/normals/edge labels,
  written in the NYUD multi-task folder layout;
- :mod:`ftn.dense.nyud` — the NYUD multi-task dataset and joint augmentations;
- :mod:`ftn.dense.metrics` — losses, dataset-level metrics (mIoU, RMSE, angle errors, odsF) and
  the multi-task gain Δm;
- :mod:`ftn.dense.deeplab` — DeepLabv3+ heads and a stride-4/stride-16 encoder wrapper;
- :mod:`ftn.dense.model` — FTN on a frozen two-scale encoder, single-task and multi-task networks;
- :mod:`ftn.dense.train` — the dense training harness (FTN and both baselines, Δm, parameters) and
  the YAML config of the paper's NYUD setup;
- :mod:`ftn.dense.demo` — ``ftn demo --dense`` on the embedded scenes.
"""

from .deeplab import DeepLabV3Plus, DeepLabV3PlusHead, MultiScaleEncoder, aspp_rates
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
from .model import DenseEncoder, DenseHead, MultiTaskNet, SingleTaskNet, build_dense_ftn, build_encoder, build_head
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
from .train import (
    DenseExperimentConfig,
    evaluate_dense,
    load_dense_config,
    run_dense,
    train_dense_from_config,
)

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
    "DenseEncoder",
    "DenseHead",
    "SingleTaskNet",
    "MultiTaskNet",
    "build_encoder",
    "build_head",
    "build_dense_ftn",
    "DenseExperimentConfig",
    "load_dense_config",
    "evaluate_dense",
    "run_dense",
    "train_dense_from_config",
    "run_dense_demo",
    "format_dense_table",
]
