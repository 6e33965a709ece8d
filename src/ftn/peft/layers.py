"""PEFT tuner layers that run ftn's own wrappers.

A targeted Conv/Linear layer becomes an :class:`FTNPeftFactors`, a norm layer an
:class:`FTNPeftNorm`. Each keeps PEFT's layout — the frozen module as ``base_layer`` and the
adapters' weights in one ``ModuleDict`` keyed by adapter name (``ftn_factors``: one
:class:`~ftn.core.updates.CPFactors` per adapter; ``ftn_norms``: one norm copy per adapter) — and
computes with the wrapper ftn itself uses for that module (:class:`~ftn.core.layers.FTNConv`,
:class:`~ftn.core.layers.FTNLinear` or :class:`~ftn.core.norms.TaskNorm`), built over the *same* base module and the *same*
``ModuleDict`` (its ``tasks``). So the CP math, the fast backward, the eval cache, padding modes,
groups and depthwise convs are ftn's, not a copy.

The wrapper (``ftn_engine``) is held outside the module tree: registered as a child it would
list ``base_layer`` a second time, and PEFT treats every child of a tuner layer other than
``base_layer`` as adapter state to save.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..core.config import validate_task_name
from ..core.cp import max_efficient_rank
from ..core.errors import ConfigError
from ..core.layers import FTNConv, FTNLayer, FTNLinear, TaskContext
from ..core.norms import TaskNorm, is_norm

__all__ = ["FTNPeftLayer", "FTNPeftFactors", "FTNPeftNorm", "make_layer"]


class FTNPeftLayer(nn.Module, BaseTunerLayer):
    """What the two layer kinds share: PEFT's adapter bookkeeping around an ftn wrapper."""

    adapter_attr: ClassVar[str]

    def __init__(self, base_layer: nn.Module, engine: FTNLayer | TaskNorm) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        # The wrapper's per-task ModuleDict is the adapters' ModuleDict: one object, two views.
        setattr(self, self.adapter_attr, engine.tasks)
        self.__dict__["ftn_engine"] = engine  # not a child, see the module docstring
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = []

    @property
    def tasks(self) -> nn.ModuleDict:
        return self.ftn_engine.tasks

    def active_task(self) -> str | None:
        """The one active adapter this layer holds, or None. FTN runs one task at a time."""
        present = [a for a in self.active_adapters if a in self.tasks]
        if len(present) > 1:
            raise ConfigError(f"FTN adapters run one at a time, but {present} are all active; "
                              f"choose one with set_adapter(name)")
        return present[0] if present else None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        task = None if self.merged else self.active_task()
        if task is None:
            return self.base_layer(x, *args, **kwargs)
        engine = self.ftn_engine
        engine.training = self.training  # eval cache and norm mode follow this module's mode
        engine.context.active = task
        return engine(x, *args, **kwargs)

    def _check_merge(self, names: list[str]) -> None:
        if len(names) + len(self.merged_adapters) > 1:
            raise ConfigError(f"FTN merges one adapter at a time (asked: {names}, already merged: "
                              f"{self.merged_adapters}); merge_and_unload(adapter_names=[name]) or unmerge first")

    def delete_adapter(self, adapter_name: str) -> None:
        self.ftn_engine.remove_task(adapter_name)  # also drops its eval-cache entry and recorded rank
        super().delete_adapter(adapter_name)

    def extra_repr(self) -> str:
        return f"adapters={list(self.tasks)}"


class FTNPeftFactors(FTNPeftLayer):
    """A Conv1d/2d/3d or Linear layer with FTN's per-adapter CP factors of ΔW."""

    adapter_attr = "ftn_factors"
    adapter_layer_names = ("ftn_factors",)
    # Each adapter's requested rank (before the rank cap; also for adapters capped to rank 0,
    # which hold no factors here): the engine's own record, for the parameter report.
    other_param_names = ("ftn_requested",)

    def __init__(self, base_layer: nn.Module, engine: FTNLayer) -> None:
        super().__init__(base_layer, engine)
        self.ftn_requested = engine.requested_ranks

    def update_layer(self, adapter_name: str, config: Any, rank: int) -> None:
        """Add ``adapter_name`` at ``rank`` (capped as ftn caps it), then restore PEFT's active set."""
        validate_task_name(adapter_name)
        engine = self.ftn_engine
        applied = min(rank, max_efficient_rank(engine.modes)) if config.rank_cap else rank
        if applied > 0:
            engine.add_task(adapter_name, applied, config.factor_init, requested_rank=rank)
        else:
            engine.requested_ranks[adapter_name] = rank  # not adapted here; the report still lists it
        if config.fast_backward is not None:
            engine.fast_backward = config.fast_backward
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW of ``adapter_name`` in the base weight's shape (ftn's :meth:`FTNLayer.delta_weight`)."""
        return self.ftn_engine.delta_weight(adapter_name)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.tasks]
        if not names:
            return
        self._check_merge(names)
        weight = self.base_layer.weight
        for name in names:
            with torch.no_grad():
                merged = weight + self.get_delta_weight(name)  # what ftn's merge writes, bit for bit
                if safe_merge and not torch.isfinite(merged).all():
                    raise ConfigError(f"merging adapter {name!r} gives non-finite weights; the adapter is broken")
                weight.copy_(merged)  # in place: bumps the version, so ftn's eval cache rebuilds
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                self.base_layer.weight.sub_(self.get_delta_weight(name))


class FTNPeftNorm(FTNPeftLayer):
    """A normalisation layer with a trainable per-adapter copy (ftn's task norms). The frozen
    pretrained norm stays in eval mode, so its running statistics never move."""

    adapter_attr = "ftn_norms"
    adapter_layer_names = ("ftn_norms",)

    def __init__(self, base_layer: nn.Module, engine: TaskNorm) -> None:
        super().__init__(base_layer, engine)
        self.__dict__["_unmerged_state"] = None

    def update_layer(self, adapter_name: str, config: Any, rank: int | None = None) -> None:
        validate_task_name(adapter_name)
        self.ftn_engine.training = self.training
        self.ftn_engine.add_task(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def train(self, mode: bool = True) -> FTNPeftNorm:
        super().train(mode)
        self.base_layer.eval()
        return self

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.tasks]
        if not names:
            return
        self._check_merge(names)
        base = self.base_layer
        self.__dict__["_unmerged_state"] = {k: v.detach().clone() for k, v in base.state_dict().items()}
        base.load_state_dict(self.tasks[names[0]].state_dict())  # the task's norm, statistics included
        self.merged_adapters.append(names[0])

    def unmerge(self) -> None:
        if self.merged_adapters:
            self.base_layer.load_state_dict(self.__dict__["_unmerged_state"])
            self.__dict__["_unmerged_state"] = None
            self.merged_adapters.clear()


def make_layer(target: nn.Module, name: str) -> FTNPeftLayer:
    """The tuner layer for module ``target`` (named ``name``), built on ftn's wrapper for it."""
    if isinstance(target, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return FTNPeftFactors(target, FTNConv(target, TaskContext(), name))
    if isinstance(target, nn.Linear):
        return FTNPeftFactors(target, FTNLinear(target, TaskContext(), name))
    if is_norm(target):
        return FTNPeftNorm(target, TaskNorm(target, TaskContext(), name))
    raise ConfigError(f"FTN cannot adapt {name!r} ({type(target).__name__}): it adapts nn.Linear, "
                      f"nn.Conv1d/2d/3d and norm layers; leave it out of target_modules (or add it to exclude_modules)")
