"""Task-specific normalisation layers.

Each task gets its own copy of every normalisation layer of the backbone, initialised from the
pretrained one: BatchNorm copies carry their own affine *and* running statistics, LayerNorm and
GroupNorm copies their own affine. The pretrained layer stays frozen as ``.base`` and always
runs in eval mode, so the shared backbone never changes, whatever mode the model is in.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import DataError, TaskError
from .layers import BaseWrapper, MixedTasks, TaskContext
from .mixed import drop_stacks, mixed_norm_forward

__all__ = ["TaskNorm", "is_norm", "NORM_TYPES", "recalibrate_batchnorm", "task_batchnorms", "recalibrate_norms"]

NORM_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)
if hasattr(nn, "RMSNorm"):
    NORM_TYPES = (*NORM_TYPES, nn.RMSNorm)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES)


class TaskNorm(BaseWrapper):
    """A frozen normalisation layer plus one trainable copy per task. Attributes of the norm
    read through (``num_features``, ``eps``); its tensors (``weight``, ``running_mean``) are
    the active task's."""

    mixed_batches = True  # forward splits a MixedTasks batch by task

    def __init__(self, base: nn.Module, context: TaskContext | None = None, name: str = "") -> None:
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        base.eval()
        self.tasks = nn.ModuleDict()
        self.context = context if context is not None else TaskContext()
        self.layer_name = name or type(base).__name__

    def add_task(self, task: str) -> None:
        if task in self.tasks:
            raise TaskError(f"norm layer {self.layer_name!r} already has task {task!r}")
        norm = copy.deepcopy(self.base)
        norm.requires_grad_(True)
        norm.train(self.training)
        self.tasks[task] = norm

    def remove_task(self, task: str) -> None:
        if task in self.tasks:
            del self.tasks[task]
        drop_stacks(self)  # its slot in the mixed-batch stacks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = self.context.active
        if type(active) is str:  # the common case, without the submodule lookups of task_module
            norm = self._modules["tasks"]._modules.get(active)
            return (norm if norm is not None else self._modules["base"])(x)
        if isinstance(active, MixedTasks):
            if active.grouped:
                y = mixed_norm_forward(self, x, active)  # one pass, each row's own affine
                if y is not None:
                    return y
            return active.apply(x, lambda task, part: self.task_module(task)(part))
        return self.task_module(active)(x)

    def train(self, mode: bool = True) -> TaskNorm:
        super().train(mode)
        self.base.eval()  # the pretrained statistics are shared and must never move
        return self

    def task_module(self, task: str | None) -> nn.Module:
        return self.tasks[task] if task is not None and task in self.tasks else self.base

    def _task_tensor(self, name: str) -> torch.Tensor | None:
        context = self.__dict__.get("context")  # not self.context: may run before __init__ set it
        active = context.active if context is not None else None
        if isinstance(active, str) and active in self.tasks:
            value = getattr(self.tasks[active], name, None)
            return value if isinstance(value, torch.Tensor) else None
        return None

    def merged_module(self, task: str | None) -> nn.Module:
        """The task's own copy of the norm as a plain module (the pretrained one for no task)."""
        merged = copy.deepcopy(self.task_module(task))
        merged.requires_grad_(True)
        return merged

    def extra_repr(self) -> str:
        return f"name={self.layer_name!r}, tasks={list(self.tasks)}"


def _first_tensor(batch: Any) -> Any:
    """The model input of a data-loader batch: ``x`` of ``(x, y, ...)``, or the batch itself."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, dict) and "image" in batch:
        return batch["image"]
    return batch


@torch.no_grad()
def recalibrate_batchnorm(
    run: Callable[[Any], Any],
    batchnorms: Iterable[_BatchNorm],
    loader: Iterable[Any],
    max_batches: int | None = None,
    input_fn: Callable[[Any], Any] | None = None,
) -> int:
    """Recompute BatchNorm running statistics as a plain average over ``loader``.

    ``run(x)`` is the forward pass to use (it must already select the task); only the given
    BatchNorm layers are put in train mode and reset, with ``momentum=None`` (cumulative average),
    so they end up with the exact statistics of the data under the final weights. Everything
    else is left in the mode it was in. Returns the number of batches used.
    """
    batchnorms = [bn for bn in batchnorms if bn.track_running_stats]
    saved = [(bn, bn.momentum, bn.training) for bn in batchnorms]
    # Kept so that a failure (or an empty loader) leaves the old statistics, not reset ones.
    snapshot = [copy.deepcopy(bn.state_dict()) for bn in batchnorms]
    input_fn = input_fn or _first_tensor
    used = 0
    completed = False
    try:
        for bn in batchnorms:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        for batch in loader:
            if max_batches is not None and used >= max_batches:
                break
            run(input_fn(batch))
            used += 1
        completed = used > 0
    finally:
        for (bn, momentum, training), state in zip(saved, snapshot):
            bn.momentum = momentum
            bn.train(training)
            if not completed:
                bn.load_state_dict(state)
    if not completed:
        raise DataError("cannot recalibrate BatchNorm statistics: the data loader gave no batches")
    return used


def task_batchnorms(model: Any, name: str) -> list[_BatchNorm]:
    """Task ``name``'s own BatchNorm copies in ``model`` (an :class:`~ftn.core.model.FTNModel`)."""
    model.check_task(name)
    return [n.tasks[name] for n in model.task_norm_layers().values() if isinstance(n.tasks[name], _BatchNorm)]


def recalibrate_norms(model: Any, name: str, loader: Iterable[Any], max_batches: int | None = None,
                      input_fn: Callable[[Any], Any] | None = None) -> int:
    """Recompute task ``name``'s BatchNorm running statistics in ``model`` over ``loader`` with
    the current weights (:func:`recalibrate_batchnorm`); other modules stay in eval mode."""
    was_training = model.training
    model.eval()
    try:
        return recalibrate_batchnorm(lambda x: model.backbone_features(x, task=name),
                                     task_batchnorms(model, name), loader, max_batches, input_fn)
    finally:
        model.train(was_training)
