"""Recompute a layer's training output in the backward instead of keeping it.

In ``conv → BatchNorm`` the BatchNorm saves its input, the conv's output, until the backward.
For a depthwise conv that tensor is as large as the block's widest activation, yet rebuilding it
from the conv's input (which the conv keeps for its own backward anyway) costs one depthwise conv,
a few percent of a MobileNet step. :class:`OutputRecompute` does that with saved-tensor hooks
(``torch.autograd.graph.saved_tensors_hooks``) around a training forward: a layer marks its
output with a recipe, and when any later op saves exactly that tensor, unmodified, the recipe is
stored in its place and run when the backward unpacks it. Everything else is saved as usual.
:func:`recompute_depthwise` turns it on for a model's adapted depthwise convs.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["OutputRecompute", "recompute_depthwise"]


class _Recipe:
    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], Tensor]) -> None:
        self.fn = fn


class OutputRecompute:
    """Marks and hooks for one model (shared by its layers through their ``TaskContext``)."""

    def __init__(self) -> None:
        self.active = False  # inside a training forward that recomputes
        self._marked: dict[int, tuple[weakref.ref, int, Callable[[], Tensor]]] = {}

    def mark(self, output: Tensor, recompute: Callable[[], Tensor]) -> None:
        """``recompute()`` rebuilds ``output``'s value (run under ``no_grad`` in the backward)."""
        self._marked[id(output)] = (weakref.ref(output), output._version, recompute)

    def _pack(self, t: Tensor):
        entry = self._marked.get(id(t))
        # The same tensor (not a reused id) and not modified in place since it was produced:
        # an in-place op would make the saved value differ from what the recipe rebuilds.
        if entry is not None and entry[0]() is t and t._version == entry[1]:
            return _Recipe(entry[2])
        return t

    @staticmethod
    def _unpack(saved):
        if isinstance(saved, _Recipe):
            with torch.no_grad():
                return saved.fn()
        return saved

    @contextmanager
    def forward(self) -> Iterator[None]:
        """Around one training forward; the marks live only until it returns (packing happens
        in the forward; the recipes then hold what they need until the backward)."""
        self.active = True
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self.active = False
            self._marked.clear()


def recompute_depthwise(model: Any, enabled: bool = True) -> int:
    """Trade compute for memory in training: the output of every adapted depthwise conv of
    ``model`` (an :class:`~ftn.core.model.FTNModel`) is rebuilt in the backward (one more
    depthwise conv each) instead of being kept by the BatchNorm that follows it. Gradients are
    unchanged. Returns how many layers it applies to; ``enabled=False`` turns it off."""
    count = 0
    for layer in model.adapted_layers().values():
        base = layer.base
        if isinstance(base, nn.Conv2d) and base.groups > 1 and base.groups == base.in_channels:
            layer.recompute_output = enabled
            count += enabled
    model.context.recompute = OutputRecompute() if count else None
    return count
