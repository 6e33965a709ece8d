"""Counting what a step dispatches, the cost that bounds a GPU step at the batch sizes people use
(each aten op is at least one kernel launch plus Python and dispatcher work).

``count_ops(fn)`` runs ``fn`` under a :class:`~torch.utils._python_dispatch.TorchDispatchMode` and
returns the aten ops it dispatched, split into compute ops (what launches kernels) and views
(metadata only, free on any device), plus the host-device synchronisations: the reads of a
tensor's value on the host (``.item()``, ``bool(t)``, ``t.tolist()``...), which on a GPU wait for
every kernel queued before them. Counts do not depend on timing, so tests can assert them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCount", "count_ops"]

# Ops that read a tensor's value into Python: a device sync on CUDA.
_SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "equal", "item", "nonzero", "unique", "masked_select"}


@dataclass
class OpCount:
    compute: Counter = field(default_factory=Counter)  # op name -> calls (non-view)
    views: Counter = field(default_factory=Counter)
    syncs: Counter = field(default_factory=Counter)  # op name -> value reads on the host
    host: Counter = field(default_factory=Counter)  # ops on ``host_tensors`` (not counted above)

    @property
    def ops(self) -> int:
        return sum(self.compute.values())

    @property
    def host_syncs(self) -> int:
        return sum(self.syncs.values())

    def top(self, n: int = 10) -> list[tuple[str, int]]:
        return self.compute.most_common(n)


class _Counter(TorchDispatchMode):
    def __init__(self, count: OpCount, host: set[int]) -> None:
        super().__init__()
        self.count, self.host = count, host

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        if self.host and any(isinstance(a, torch.Tensor) and a.device.type == "cpu" and a.data_ptr() in self.host
                             for a in args):
            self.count.host[name] += 1  # host-side bookkeeping: no kernel, no wait
        elif name in _SYNC_OPS:
            self.count.syncs[name] += 1
            self.count.compute[name] += 1
        elif func.is_view or name in _FREE:
            self.count.views[name] += 1
        else:
            self.count.compute[name] += 1
        return func(*args, **(kwargs or {}))


# Metadata-only ops that are not flagged as views: no kernel on any device.
_FREE = {"_unsafe_view", "lift_fresh", "detach", "alias", "_reshape_alias", "set_", "empty", "empty_like",
         "empty_strided", "resize_"}


def count_ops(fn: Callable[[], Any], *, host_tensors: Iterable[torch.Tensor] = ()) -> tuple[Any, OpCount]:
    """Run ``fn()`` and count what it dispatched. Returns ``(fn's result, OpCount)``.

    ``host_tensors``: tensors that live on the host on purpose (an optimizer's CPU step counters,
    which torch reads with ``.item()`` without waiting for the device); reading them is not
    counted as a sync."""
    count = OpCount()
    # Recognised by address (reading it dispatches nothing); only CPU tensors are compared, since
    # others cannot be host bookkeeping and some tensor kinds have no address to read.
    with _Counter(count, {t.data_ptr() for t in host_tensors}):
        result = fn()
    return result, count
