"""What differs between the three settings, and nothing else.

A :class:`Setting` (classification, dense, text) tells the runner which tasks a config trains,
builds the backbone, each task's :class:`TaskData` and the task's head. A task's data carries
its :class:`Objective`: the loss of a batch, the metrics of a split and the score that selects
the best epoch. The training engine (:mod:`ftn.training.engine`) and the methods
(:mod:`ftn.training.methods`) know nothing else about the setting.

Batches are whatever the datasets' collate gives (tensors, tuples of tensors, dicts); the engine
moves them to the device as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..core.errors import DataError
from . import distributed as dist
from .config import DataConfig, ExperimentConfig, ModelConfig

if TYPE_CHECKING:
    from .methods import TrainableTask

__all__ = ["Setting", "TaskData", "Objective", "Classify", "mean_accuracy"]


class Objective:
    """Loss, metrics and model-selection score of one task's batches."""

    #: True when :meth:`metrics` sums its counts over torchrun ranks itself, so each rank is
    #: given only its share of an evaluation split; False: every rank reads the whole split.
    sharded: ClassVar[bool] = False

    def inputs(self, batch: Any) -> tuple[Any, ...]:
        """The model's positional inputs in ``batch``."""
        raise NotImplementedError

    def loss(self, model: TrainableTask, batch: Any) -> Tensor:
        """The training loss of a batch already on the device. It must not read a value back to
        the host (``.item()``, ``int(t)``, a branch on a tensor): on a GPU that waits for every
        queued kernel, each step. Checks of the data belong in :meth:`check`."""
        raise NotImplementedError

    def check(self, batch: Any, split: str) -> None:
        """Refuse a bad batch with a clear error. Called by the engine on the batch as the loader
        gives it, before it is moved to the device, so looking at values costs no device sync.
        Default: nothing to check."""

    def metrics(self, model: TrainableTask, batches: Iterable[Any]) -> dict[str, float]:
        raise NotImplementedError

    def score(self, metrics: dict[str, float]) -> float:
        """Higher is better; the engine keeps the epoch with the best validation score."""
        raise NotImplementedError

    def example_stats(self, model: TrainableTask, batches: Iterable[Any]) -> np.ndarray | None:
        """Per-example statistics of a split, an ``(n_examples, k)`` array in the split's order
        whose column sums give the metrics back (:meth:`metrics_from_stats`), so a bootstrap
        can resample examples (``ftn sweep``'s paired intervals). None: not available (the
        sweep then falls back to intervals over seeds)."""
        return None

    def metrics_from_stats(self, total: np.ndarray) -> dict[str, float]:
        """The metrics of the examples whose :meth:`example_stats` rows sum to ``total``."""
        raise NotImplementedError

    def score_from_stats(self, total: np.ndarray) -> float:
        """``score(metrics_from_stats(total))`` (what a bootstrap replicate needs); an objective
        may override it with a shortcut that gives the same value."""
        return float(self.score(self.metrics_from_stats(total)))


class Classify(Objective):
    """Batches ``(*inputs, labels)``: cross-entropy, top-1 accuracy in %."""

    sharded = True

    def __init__(self, num_classes: int, task: str = "") -> None:
        self.num_classes = num_classes
        self.task = task

    def inputs(self, batch: Any) -> tuple[Any, ...]:
        return tuple(batch[:-1])

    @torch.no_grad()
    def check(self, batch: Any, split: str) -> None:
        """Cross-entropy would fail deep inside (or, on GPU, assert) on a bad label: say which."""
        y = batch[-1]
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            bad = y[(y < 0) | (y >= self.num_classes)].unique().tolist()[:5]
            raise DataError(f"task {self.task!r} ({split} data): labels {bad} are outside the class range "
                            f"0..{self.num_classes - 1}")

    def loss(self, model: TrainableTask, batch: Any) -> Tensor:
        return F.cross_entropy(model(*self.inputs(batch)).float(), batch[-1])

    def metrics(self, model: TrainableTask, batches: Iterable[Any]) -> dict[str, float]:
        counts, device = torch.zeros(2, dtype=torch.float64), None
        for batch in batches:
            y = batch[-1]
            self.check(batch, "evaluation")
            counts[0] += (model(*self.inputs(batch)).argmax(-1) == y).sum().item()
            counts[1] += y.numel()
            device = y.device
        correct, total = dist.all_reduce_sum(counts.to(device or dist.device())).tolist()
        return {"acc": 100.0 * correct / max(total, 1)}

    def score(self, metrics: dict[str, float]) -> float:
        return metrics["acc"]

    def example_stats(self, model: TrainableTask, batches: Iterable[Any]) -> np.ndarray:
        """One row per example: (correct 0/1, 1)."""
        rows = []
        for batch in batches:
            y = batch[-1]
            self.check(batch, "evaluation")
            correct = (model(*self.inputs(batch)).argmax(-1) == y).double().cpu().numpy()
            rows.append(np.stack([correct, np.ones_like(correct)], axis=1))
        return np.concatenate(rows) if rows else np.zeros((0, 2))

    def metrics_from_stats(self, total: np.ndarray) -> dict[str, float]:
        return {"acc": 100.0 * float(total[0]) / max(float(total[1]), 1.0)}


def mean_accuracy(results: dict[str, Any]) -> dict[str, Any]:
    """``mean_test_acc`` over the tasks' results (summaries of :class:`Classify` settings)."""
    tests = [r["test"]["acc"] for r in results.values() if r["test"] is not None]
    return {"mean_test_acc": sum(tests) / len(tests) if tests else None}


@dataclass
class TaskData:
    """One task's splits and objective, as the engine trains them."""

    name: str
    train: Dataset
    val: Dataset | None  # model selection (None: the last epoch is kept)
    test: Dataset | None  # reported
    objective: Objective
    # The training split read with the evaluation transform (same samples as ``train``), which
    # BatchNorm statistics are recalibrated on; None when ``train`` has no per-sample augmentation.
    recal: Dataset | None = None
    augment: Callable[[Any], Any] | None = None  # batch-level, on the device, uses the global RNG
    collate: Callable[[list[Any]], Any] | None = None  # None: torch's default collate
    min_batch: int = 1  # a last batch smaller than this is dropped (BatchNorm needs 2 samples)
    # Saved with the task's adapter for serving (``ftn predict`` / ``ftn serve``): ``labels``
    # (class names), ``input`` (preparation) and, for dense tasks, ``outputs``.
    info: dict[str, Any] | None = None


class Setting:
    """One kind of experiment. Subclasses declare their config sections and build the parts;
    ``ftn.training.config.SETTINGS`` lists them."""

    name: ClassVar[str]
    data_config: ClassVar[type[DataConfig]] = DataConfig
    model_config: ClassVar[type[ModelConfig]] = ModelConfig

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg

    @classmethod
    def validate(cls, cfg: ExperimentConfig) -> None:
        """Checks of the setting's own sections (ConfigError naming the key)."""

    def tasks(self) -> list[str]:
        """The tasks ``ftn train`` trains, in order."""
        raise NotImplementedError

    def task_seed(self, index: int) -> int:
        """Seed of the ``index``-th task (its head, its data order)."""
        return self.cfg.seed + index

    def backbone(self) -> nn.Module:
        """The pretrained backbone (inputs → features), built the same way in every process."""
        raise NotImplementedError

    def head(self, data: TaskData) -> nn.Module:
        """A new head for the task of ``data`` on the backbone's features."""
        raise NotImplementedError

    def data(self, task: str) -> TaskData:
        raise NotImplementedError

    def summarize(self, results: dict[str, Any]) -> dict[str, Any]:
        """Setting-specific entries of ``results.json`` from each task's result (as dicts)."""
        return {}

    #: Whether every task is scored on the same test examples (the dense tasks share their
    #: images), so that a bootstrap resamples the examples of all tasks together.
    shared_examples: ClassVar[bool] = False

    def gain_metrics(self) -> dict[str, tuple[str, int]]:
        """Per task predicted: the headline metric (its key in the test metrics) and its
        direction (+1: higher is better) that ``ftn sweep --gain-reference`` averages into the
        multi-task gain Δm. Empty: the setting has no Δm."""
        return {}

    def split_example_stats(self, task: str, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The per-example statistics of training task ``task`` by the tasks it predicts, each
        in the layout of that task's own objective (a joint model predicts several)."""
        return {task: rows}
