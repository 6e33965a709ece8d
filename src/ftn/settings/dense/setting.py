"""The dense multi-task setting (NYUD-v2 layout): semseg, depth, normals and edge on one encoder.

A *task* of the training engine is one dense task with its own DeepLabv3+ decoder, or, with
``data.joint=true``, one task named ``all`` whose head holds every decoder and whose loss is the
weighted sum Σ_t w_t L_t. So every method of :mod:`ftn.training.methods` works here:

- ``method.name=ftn``: the encoder frozen, each dense task its own ΔW (rank per task:
  ``method.ranks``), its own encoder norms and its own decoder (the paper's setting);
- ``method.name=full``: single-task full fine-tuning, one encoder copy per task; with
  ``data.joint=true`` the shared-encoder multi-task network;
- ``linear``, ``norm_head``, ``lora``: as in the other settings.

Each task uses the same loss weight ``w_t`` in every method (so methods differ only in what is
shared); the defaults are Multi-Task-Learning-PyTorch's NYUD weights (semseg 1, depth 1, normals
10, edge 50). What the setting knows about each dense task (loss, meter, metrics kept, headline
metric and its direction) is the task's record in :mod:`ftn.settings.dense.tasks`. Metrics are
dataset-level (:mod:`ftn.settings.dense.metrics`), reported on ``data.test_split`` (NYUD's
``val``); there is no model selection unless ``data.val_split`` is set (then the epoch with the
lowest weighted validation loss is kept). :func:`compare` adds the multi-task gain Δm
of each run against a single-task baseline run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from ...core.errors import ConfigError
from ...training.config import DataConfig, ExperimentConfig, ModelConfig, check_choice
from ...training.methods import TrainableTask
from ...training.setting import Objective, Setting, TaskData
from .metrics import multi_task_gain
from .model import DenseHeads, build_encoder, build_head
from .nyud import IMAGENET_MEAN, IMAGENET_STD, JointCompose, NYUDMultiTask, RandomCrop, RandomHorizontalFlip, RandomScale, Resize
from .tasks import DENSE_TASKS, NORMALS_STATS_RESOLUTION, DenseTask, dense_task, dense_task_names, main_metrics

__all__ = ["DenseDataConfig", "DenseModelConfig", "DenseSetting", "DenseObjective", "DenseTask", "JOINT",
           "NORMALS_STATS_RESOLUTION", "compare", "task_loss", "dense_adapter_info"]

#: The name of the one training task of ``data.joint=true``.
JOINT = "all"


@dataclass
class DenseDataConfig(DataConfig):
    root: str | None = None  # NYUD-layout folder (real NYUD-v2 or write_nyud_layout output)
    tasks: list[str] = field(default_factory=lambda: list(dense_task_names()))  # default: every registered task
    joint: bool = False  # true: one model for all tasks (full → the shared-encoder multi-task network)
    num_classes: int | None = None  # None: from classes.json, else 40 (NYUD-v2)
    train_split: str = "train"
    val_split: str | None = None  # model selection; None: keep the last epoch
    test_split: str = "val"  # reported (NYUD has train and val only)
    crop: list[int] = field(default_factory=lambda: [425, 560])  # (height, width) training crop
    scale_min: float = 0.5  # random scale range before cropping
    scale_max: float = 2.0
    flip: bool = True
    eval_size: list[int] | None = None  # None: evaluate at the images' own size
    batch_size: int = 8
    eval_batch_size: int = 8
    # Losses: the same weight multiplies a task's loss in every method (default: each task's record).
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {name: task.loss_weight for name, task in DENSE_TASKS.items()})
    edge_pos_weight: float = 0.95
    normals_loss: str = "l1"  # l1 | cosine
    # Edge metric (BSDS protocol): thresholds and matching tolerance (fraction of the diagonal, or pixels).
    edge_thresholds: int = 99
    edge_max_dist: float = 0.011  # NYUD tolerance, fraction of the image diagonal (HED/RCF/multi-task papers)
    edge_tolerance_px: float | None = None  # overrides edge_max_dist
    edge_nms: bool = True  # edge non-maximum suppression before thinning (HED/RCF evaluation)


@dataclass
class DenseModelConfig(ModelConfig):
    backbone: str = "resnet18"  # resnet18 | resnet34 | resnet50 | mobilenet_v2
    output_stride: int = 16
    aspp_channels: int = 256
    low_channels: int = 48
    decoder_channels: int = 256


def task_loss(task: str, pred: Tensor, batch: Mapping[str, Tensor], d: DenseDataConfig) -> Tensor:
    """The task's unweighted loss (CE, masked L1, normals L1/cosine, balanced BCE)."""
    return dense_task(task).loss(pred, batch[task], d)


class DenseObjective(Objective):
    """Batches are NYUD sample dicts; the model returns ``{task: map}`` for its ``tasks``.

    The reported ``loss`` is the mean over images of each image's weighted loss Σ_t w_t L_t (the
    same for any evaluation batch size); the other metrics are the meters' dataset-level ones.
    :meth:`example_stats` keeps, per image, its weighted loss and every meter's per-image
    statistics (:mod:`ftn.settings.dense.metrics`), so the metrics can be recomputed for any resample of
    the images: exactly, except the median normal angle (0.5° histogram bins there).
    """

    def __init__(self, tasks: Iterable[str], num_classes: int, d: DenseDataConfig) -> None:
        self.tasks = tuple(tasks)
        self.num_classes = num_classes
        self.d = d
        self._stat_columns: list[tuple[str, Any, slice]] | None = None  # see _columns

    def inputs(self, batch: Any) -> tuple[Any, ...]:
        return (batch["image"],)

    def _loss(self, out: Mapping[str, Tensor], batch: Any) -> Tensor:
        return sum(float(self.d.loss_weights.get(t, 1.0)) * task_loss(t, out[t].float(), batch, self.d)
                   for t in self.tasks)  # type: ignore[return-value]

    def _image_losses(self, out: Mapping[str, Tensor], batch: Any) -> np.ndarray:
        """Each image's weighted loss (its own valid pixels only)."""
        return np.array([float(self._loss({t: out[t][i:i + 1] for t in self.tasks},
                                          {t: batch[t][i:i + 1] for t in self.tasks}))
                         for i in range(len(batch["image"]))], dtype=np.float64)

    def loss(self, model: TrainableTask, batch: Any) -> Tensor:
        return self._loss(model(batch["image"]), batch)

    def _meters(self, stats: bool = False) -> dict[str, Any]:
        specs = {t: dense_task(t) for t in self.tasks}
        return {t: ((s.stats_meter if stats and s.stats_meter else s.meter)(self.num_classes, self.d))
                for t, s in specs.items()}

    def _evaluate(self, model: TrainableTask, batches: Iterable[Any],
                  each: Callable[[np.ndarray, dict[str, tuple[Tensor, Tensor]]], None]) -> None:
        """For each batch: ``each(per-image losses, {task: (meter input, target)})``."""
        for batch in batches:
            out = model(batch["image"])
            pairs = {}
            for t in self.tasks:
                pred = out[t].float()
                pairs[t] = ((torch.sigmoid(pred) if dense_task(t).probabilities else pred).cpu(), batch[t].cpu())
            each(self._image_losses(out, batch), pairs)

    def _result(self, loss: float, values: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
        result = {"loss": loss}
        for t in self.tasks:
            result.update({f"{t}/{k}": float(values[t][k]) for k in dense_task(t).reported})
        return result

    def metrics(self, model: TrainableTask, batches: Iterable[Any]) -> dict[str, float]:
        meters = self._meters()
        losses: list[np.ndarray] = []

        def each(loss: np.ndarray, pairs: dict[str, tuple[Tensor, Tensor]]) -> None:
            losses.append(loss)
            for t, (pred, target) in pairs.items():
                meters[t].update(pred, target)

        self._evaluate(model, batches, each)
        loss = np.concatenate(losses) if losses else np.zeros(0)
        return self._result(float(loss.sum()) / max(loss.size, 1), {t: m.compute() for t, m in meters.items()})

    def example_stats(self, model: TrainableTask, batches: Iterable[Any]) -> np.ndarray:
        """One row per image: (weighted loss, 1), then each task's meter statistics in
        ``tasks`` order (semseg: the C × C confusion matrix; depth: 6 sums; normals: 6 sums and
        a 0.5° angle histogram; edge: BSDS counts at every threshold and at the image's best)."""
        meters = self._meters(stats=True)
        rows: list[np.ndarray] = []

        def each(loss: np.ndarray, pairs: dict[str, tuple[Tensor, Tensor]]) -> None:
            cols = [loss[:, None], np.ones((loss.size, 1))]
            cols += [np.asarray(meters[t].image_stats(p, y), dtype=np.float64) for t, (p, y) in pairs.items()]
            rows.append(np.concatenate(cols, axis=1))

        self._evaluate(model, batches, each)
        return np.concatenate(rows) if rows else np.zeros((0, 2 + sum(m.stats_width() for m in meters.values())))

    def _columns(self) -> list[tuple[str, Any, slice]]:
        """Per task: its statistics meter and its columns in an :meth:`example_stats` row (after
        the loss and count). Built once: a bootstrap asks for it in every replicate."""
        if self._stat_columns is None:
            self._stat_columns, start = [], 2
            for t, m in self._meters(stats=True).items():
                self._stat_columns.append((t, m, slice(start, start + m.stats_width())))
                start += m.stats_width()
        return self._stat_columns

    def metrics_from_stats(self, total: np.ndarray) -> dict[str, float]:
        values = {t: m.from_stats(total[cols]) for t, m, cols in self._columns()}
        return self._result(float(total[0]) / max(float(total[1]), 1.0), values)

    def score(self, metrics: dict[str, float]) -> float:
        """−weighted loss per task (model selection on validation, and ``ftn sweep``'s dense
        score): divided by the number of tasks, so that a joint model's score is on the scale of
        the mean over per-task models' scores."""
        return -metrics["loss"] / len(self.tasks)

    def score_from_stats(self, total: np.ndarray) -> float:
        # The loss columns only: the bootstrap need not recompute every meter (BSDS's ODS search).
        return -float(total[0]) / max(float(total[1]), 1.0) / len(self.tasks)

    def split_stats(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """:meth:`example_stats` rows of several tasks → per task, the rows its own objective
        would give; the loss column is NaN (a joint model's weighted loss does not split)."""
        nan = np.full((len(rows), 1), np.nan)
        return {t: np.concatenate([nan, rows[:, 1:2], rows[:, cols]], axis=1) for t, _, cols in self._columns()}


def _head_kwargs(m: DenseModelConfig) -> dict[str, int]:
    return {"aspp_channels": m.aspp_channels, "low_channels": m.low_channels, "decoder_channels": m.decoder_channels}


def dense_adapter_info(cfg: ExperimentConfig, task: str, train: Dataset, num_classes: int) -> dict[str, Any] | None:
    """What a dense adapter file says about itself, so ``ftn predict`` / ``ftn serve`` can rebuild
    the encoder and decoder and write readable prediction images: output channels, encoder,
    decoder sizes. The head is this setting's :class:`DenseHeads` (``layout: "dict"``: state keys
    ``<task>.*``). None for the joint task (one head for every dense task: not servable)."""
    if task == JOINT:
        return None
    names = getattr(getattr(train, "dataset", train), "class_names", None)
    return {"labels": dense_task(task).output_labels(names, num_classes),
            "input": {"channels": 3, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "resize": "none"},
            "outputs": {"kind": "dense", "task": task, "num_classes": num_classes, "head": _head_kwargs(cfg.model),
                        "layout": "dict",
                        "encoder": {"backbone": cfg.model.backbone, "output_stride": cfg.model.output_stride}}}


def _limit(ds: Dataset, n: int | None) -> Dataset:
    return ds if n is None or n >= len(ds) else Subset(ds, range(n))  # type: ignore[arg-type]


class DenseSetting(Setting):
    name = "dense"
    data_config = DenseDataConfig
    model_config = DenseModelConfig

    @classmethod
    def validate(cls, cfg: ExperimentConfig) -> None:
        d, m = cfg.data, cfg.model
        if not d.tasks:
            raise ConfigError("data.tasks is empty")
        for t in (*d.tasks, *d.loss_weights):
            check_choice("data.tasks / data.loss_weights: task", t, dense_task_names())
        for t in cfg.method.ranks:
            check_choice("method.ranks: task", t, (*dense_task_names(), JOINT))
        check_choice("data.normals_loss", d.normals_loss, ("l1", "cosine"))
        if len(d.crop) != 2 or min(d.crop) < 8:
            raise ConfigError(f"data.crop must be [height, width] >= 8, got {d.crop}")
        if not 0 < d.scale_min <= d.scale_max:
            raise ConfigError("need 0 < data.scale_min <= data.scale_max")
        if d.batch_size < 2:
            raise ConfigError("data.batch_size must be >= 2 (ASPP's image-pooling BatchNorm needs 2 images)")
        if m.output_stride not in (8, 16, 32):
            raise ConfigError(f"model.output_stride must be 8, 16 or 32, got {m.output_stride}")

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self._splits: dict[str, Dataset] | None = None

    def tasks(self) -> list[str]:
        return [JOINT] if self.cfg.data.joint else list(self.cfg.data.tasks)

    def task_seed(self, index: int) -> int:
        return self.cfg.seed  # the same batch order for every task and method

    def backbone(self) -> nn.Module:
        m = self.cfg.model
        torch.manual_seed(self.cfg.seed)  # a randomly initialised encoder is the same everywhere
        self.encoder = build_encoder(m.backbone, m.pretrained, m.output_stride, m.weights_path)
        return self.encoder

    def _datasets(self) -> dict[str, Dataset]:
        if self._splits is None:
            d = self.cfg.data
            if not d.root:
                raise ConfigError("data.root is required (a NYUD-layout folder)")
            aug: list[Any] = []
            if (d.scale_min, d.scale_max) != (1.0, 1.0):
                aug.append(RandomScale((d.scale_min, d.scale_max)))
            aug.append(RandomCrop(tuple(d.crop)))
            if d.flip:
                aug.append(RandomHorizontalFlip())
            plain = Resize(tuple(d.eval_size)) if d.eval_size else None
            tasks = tuple(d.tasks)
            train = NYUDMultiTask(d.root, d.train_split, tasks, transform=JointCompose(aug))
            self.num_classes = d.num_classes or (len(train.class_names) if train.class_names else 40)
            self._splits = {
                "train": _limit(train, d.train_limit),
                "recal": _limit(NYUDMultiTask(d.root, d.train_split, tasks, transform=plain), d.train_limit),
                "test": _limit(NYUDMultiTask(d.root, d.test_split, tasks, transform=plain), d.test_limit)}
            if d.val_split:
                self._splits["val"] = _limit(NYUDMultiTask(d.root, d.val_split, tasks, transform=plain), d.val_limit)
        return self._splits

    def data(self, task: str) -> TaskData:
        if task not in (*self.cfg.data.tasks, JOINT):
            raise ConfigError(f"unknown dense task {task!r}; this config has {self.tasks()}")
        s = self._datasets()
        outputs = self.cfg.data.tasks if task == JOINT else [task]
        return TaskData(task, s["train"], s.get("val"), s["test"], DenseObjective(outputs, self.num_classes,
                                                                                  self.cfg.data),
                        recal=s["recal"], min_batch=2,
                        info=dense_adapter_info(self.cfg, task, s["train"], self.num_classes))

    def head(self, data: TaskData) -> nn.Module:
        """One DeepLabv3+ decoder per dense task, each initialised from ``seed + task index``
        so every method starts a task from the same decoder."""
        m = self.cfg.model
        heads = {}
        for t in data.objective.tasks:
            torch.manual_seed(self.cfg.seed * 1000 + dense_task_names().index(t))
            heads[t] = build_head(self.encoder, t, data.objective.num_classes, **_head_kwargs(m))
        return DenseHeads(heads)

    shared_examples = True  # every task is scored on the same test images

    def gain_metrics(self) -> dict[str, tuple[str, int]]:
        return {t: (f"{t}/{dense_task(t).main}", dense_task(t).directions[dense_task(t).main])
                for t in self.cfg.data.tasks}

    def split_example_stats(self, task: str, rows: np.ndarray) -> dict[str, np.ndarray]:
        if task != JOINT:
            return {task: rows}
        return self.data(JOINT).objective.split_stats(rows)  # type: ignore[attr-defined]

    def summarize(self, results: dict[str, Any]) -> dict[str, Any]:
        metrics: dict[str, dict[str, float]] = {}
        for r in results.values():
            for key, value in (r["test"] or {}).items():
                if "/" in key:
                    task, name = key.split("/", 1)
                    metrics.setdefault(task, {})[name] = value
        tasks = [t for t in self.cfg.data.tasks if t in metrics]
        return {"metrics": {t: metrics[t] for t in tasks}, "main_metrics": {t: dense_task(t).main for t in tasks}}


def compare(runs: Mapping[str, dict[str, Any]], baseline: str) -> dict[str, dict[str, Any]]:
    """Add to each run's summary its multi-task gain Δm (``delta_m``, and per task
    ``delta_per_task``) against the ``baseline`` run (single-task networks, by convention),
    over the headline metric of every task (each task record's ``main``, in the direction its
    ``directions`` give)."""
    base = runs[baseline]["metrics"]
    main = main_metrics()
    directions = {main[t]: dense_task(t).directions[main[t]] for t in base}
    flat_base = {main[t]: base[t][main[t]] for t in base}
    for run in runs.values():
        flat = {main[t]: run["metrics"][t][main[t]] for t in base}
        run["delta_m"] = multi_task_gain(flat, flat_base, directions)
        run["delta_per_task"] = {t: multi_task_gain(flat, flat_base, directions, metrics=[main[t]]) for t in base}
    return dict(runs)
