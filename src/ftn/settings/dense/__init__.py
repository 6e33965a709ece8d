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

from collections.abc import Callable, Sequence
from pathlib import Path

from ...training.config import ExperimentConfig
from ...training.settings_registry import Demo, SettingEntry
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


# ``SETTING`` declares the dense setting to ftn.training.settings_registry (``ftn demo --dense``,
# ``ftn sweep --demo dense``).
def prepare_sweep_scenes(output: str | Path, quick: bool) -> Path:
    """Render the dense demo's scenes under ``output/scenes`` (once) and write the sweep's
    ``sweep_train`` / ``sweep_val`` lists: the training scenes, the last 20 % held out for
    validation (the demo's test split, NYUD's ``val``, stays the test split)."""
    from .demo import FULL, QUICK

    size = QUICK if quick else FULL
    root = Path(output) / "scenes"
    sets = root / "gt_sets"
    marker = root / f".rendered-{size['n_train']}-{size['n_val']}-{size['size']}"
    if not marker.is_file():
        write_nyud_layout(root, size["n_train"], size["n_val"], size=(size["size"], size["size"]), seed=0, workers=2)
        marker.touch()
    ids = [line.strip() for line in (sets / "train.txt").read_text().splitlines() if line.strip()]
    n_val = max(2, int(round(len(ids) * 0.2)))
    (sets / "sweep_train.txt").write_text("\n".join(ids[:-n_val]) + "\n")
    (sets / "sweep_val.txt").write_text("\n".join(ids[-n_val:]) + "\n")
    return root


def sweep_configs(output: str | Path, quick: bool, overrides: Sequence[str]) -> Callable[[str], ExperimentConfig]:
    """``ftn sweep --demo dense``: method → the demo's config on its scenes with the held-out
    validation split; methods with a full-size update per layer (``Method.full_size_update``:
    full fine-tuning, TAPS) start from the single-task variant, the others from FTN's."""
    from ...training.methods import method_class
    from .demo import dense_demo_config

    prepare_sweep_scenes(output, quick)
    split = ["data.train_split=sweep_train", "data.val_split=sweep_val"]
    extra = list(overrides)
    return lambda method: dense_demo_config(output, "single" if method_class(method).full_size_update else "ftn",
                                            quick, [f"method.name={method}", *split, *extra])


SETTING = SettingEntry(
    name="dense",
    setting="ftn.settings.dense.setting:DenseSetting",
    score="−weighted test loss per task (mean over images), mean over tasks (higher is better; the multi-task "
          "gain Δm below, with --gain-reference, is the headline)",
    demo=Demo(name="dense", help="dense multi-task demo on embedded indoor scenes", output="outputs/dense_demo",
              run="ftn.settings.dense.demo:run_dense_demo", table="ftn.settings.dense.demo:format_dense_table",
              sweep="ftn.settings.dense:sweep_configs"),
)
__all__ += ["SETTING", "prepare_sweep_scenes", "sweep_configs"]
