"""Merging: one task of an :class:`~ftn.core.model.FTNModel` as a standalone plain-PyTorch model.

The inverse of :mod:`ftn.core.injection`: every wrapper it put in is swapped back for a plain
module with the task's W + ΔW folded in (and the task's own norms), so the result needs no ftn
code. Works on the model through its public attributes (``backbone``, ``heads``, ``check_task``).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

from torch import nn

from .injection import replace_modules

__all__ = ["merge_task", "is_wrapper"]


def is_wrapper(module: nn.Module) -> bool:
    """What :mod:`ftn.core.injection` puts in: a frozen ``.base`` and ``merged_module(task)``."""
    return "base" in module._modules and callable(getattr(type(module), "merged_module", None))


def merge_task(model: Any, name: str) -> nn.Module:
    """``nn.Sequential(backbone, head)`` for task ``name`` of ``model``, with W + ΔW folded into
    every adapted layer and the task's own norms; in ``model``'s train/eval mode."""
    model.check_task(name)
    # A copy of the backbone whose wrappers are then swapped, on their parents, for their
    # plain merged modules (all tasks' factors are copied too: small next to the backbone).
    backbone = replace_modules(copy.deepcopy(model.backbone),
                               lambda _, m: m.merged_module(name) if is_wrapper(m) else None)
    merged = nn.Sequential(OrderedDict(backbone=backbone, head=copy.deepcopy(model.heads[name])))
    merged.requires_grad_(True)
    return merged.train(model.training)
