"""The eval cache: tensors derived from parameters (W + ΔW, stacked weights), reused between
eval forwards and never served after an input changed.

One :class:`EvalCache` per module that caches (:class:`~ftn.core.layers.FTNLayer`, the attention
composites, the stacked layers of :mod:`ftn.core.multitask`). An entry is reused only while autograd
is off, the module is in eval mode and nothing is being compiled, and only if its inputs are
unchanged. Inputs come in two kinds:

- ``exact``: small tensors (CP factors, biases, norm parameters and running statistics). They
  must be the same tensor objects, and the entry keeps a copy of their values and compares it
  on every lookup (byte for byte: ``memcmp`` on CPU, ``torch.equal`` elsewhere). Version
  counters miss writes through ``.data``, fused optimizers (``AdamW(fused=True)``) and
  BatchNorm's running-statistics update; a value comparison misses nothing.
- ``tracked``: large tensors whose values are not copied: the frozen base weight W, and entries
  of other caches (compared by identity; those caches check their own inputs). They must be the
  same tensor object (held through a weak reference), at the same storage address, with the same
  version counter, shape, strides, dtype and device.

Every entry also records a process-wide generation, advanced by every ``optimizer.step()`` (a
global ``torch.optim`` step hook; fused or not) and by :func:`invalidate_eval_caches`, so either
invalidates every cache, including those of ``forward_all_tasks``. The one change no check sees:
writing the frozen base weight in place in a way that bypasses its version counter
(``W.data.add_()``, ``W.numpy()[...] = ...``, DLPack) outside an optimizer step; call
:func:`invalidate_eval_caches` after doing that. Comparing W itself would cost a full read of it
per forward and a second copy in memory.

Off the CPU each comparison costs kernels and a device sync. Inside :func:`eval_pass` (one
forward pass; ``forward_all_tasks`` opens one) the entries of one :class:`CheckGroup` (one model)
are compared in one batch at the first lookup instead. See "The eval cache" in
docs/performance.md.
"""

from __future__ import annotations

import ctypes
import operator
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["EvalCache", "EvalCachedModule", "CheckGroup", "EntryWatch", "eval_pass", "caching_enabled",
           "invalidate_eval_caches", "current_generation"]

_generation = 0


def invalidate_eval_caches() -> None:
    """Make every eval cache in the process rebuild on its next lookup. Needed only after writing
    a frozen base weight in place through ``.data`` (or NumPy / DLPack) without an optimizer step."""
    global _generation
    _generation += 1


def current_generation() -> int:
    """The process-wide generation (advanced by every ``optimizer.step()`` and by
    :func:`invalidate_eval_caches`): a cache built at another generation is stale."""
    return _generation


def _after_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    invalidate_eval_caches()


register_optimizer_step_post_hook(_after_step)


def caching_enabled(training: bool = False) -> bool:
    """Whether a lookup may reuse (and store) an entry: eval mode, autograd off, not compiling."""
    return not (training or torch.is_grad_enabled() or torch.compiler.is_compiling())


def _load_memcmp() -> Callable[[int, int, int], int] | None:
    """The C library's ``memcmp`` (POSIX), or None where it cannot be loaded."""
    try:
        fn = ctypes.CDLL(None).memcmp
    except (OSError, TypeError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
    return fn


_MEMCMP = _load_memcmp()
_JOIN_ABOVE = 3  # more tensors than this: one cat and one comparison instead of one per tensor


def _batched(device: torch.device) -> bool:
    """Whether values on ``device`` are compared in one batch per :func:`eval_pass` (each
    comparison off the CPU costs kernels and a device sync) rather than at every lookup."""
    return device.type != "cpu"


def _memcmp_args(copy: Tensor) -> tuple[int, int] | None:
    """(address, size) of ``copy`` for a CPU ``memcmp``, or None where memcmp does not apply (no
    libc memcmp, off the CPU, complex)."""
    if _MEMCMP is not None and copy.device.type == "cpu" and not copy.is_complex():
        return copy.data_ptr(), copy.nbytes
    return None


def _same_bytes(t: Tensor, copy: Tensor, raw: Any = ...) -> bool:
    """Whether ``t`` holds the values of ``copy`` (a contiguous tensor of its shape, dtype and
    device). On CPU a ``memcmp`` of the two buffers: ``torch.equal`` compares element by element
    and costs ~7× more on factor-sized tensors (a bitwise comparison also never mistakes a NaN
    for a change; a -0.0 written over 0.0 counts as one). ``raw``: ``_memcmp_args(copy)`` when
    the caller keeps it (the eval fast path: deriving it costs ~15 µs per layer and forward)."""
    if raw is ...:
        raw = _memcmp_args(copy)
    if raw is not None and t.is_contiguous():
        return raw[1] == 0 or _MEMCMP(t.data_ptr(), raw[0], raw[1]) == 0
    return torch.equal(t, copy)


def _flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]) if len(tensors) > 1 else tensors[0].reshape(-1)


class _Exact:
    """The exact inputs of an entry: weak references (their identity is checked at every lookup)
    and a copy of their values. Tensors of one dtype and device are copied into one flat buffer
    and compared at once when there are more than ``_JOIN_ABOVE`` of them or they are batched
    (:func:`_batched`); otherwise each has its own copy."""

    __slots__ = ("refs", "meta", "copies", "joined", "batched", "raw")

    def __init__(self, tensors: list[Tensor]) -> None:
        self.refs = [weakref.ref(t) for t in tensors]
        self.meta = [(t.shape, t.dtype, t.device) for t in tensors]
        kinds = {(t.dtype, t.device) for t in tensors}
        self.batched = len(kinds) == 1 and _batched(tensors[0].device)
        with torch.no_grad():
            if len(kinds) == 1 and (len(tensors) > _JOIN_ABOVE or self.batched):
                self.joined, self.copies = _flat(tensors).clone(), []
            else:
                self.joined = None
                self.copies = [t.detach().clone(memory_format=torch.contiguous_format) for t in tensors]
        self.raw = [_memcmp_args(c) for c in self.copies]  # derived once, not per lookup

    def same_tensors(self, tensors: list[Tensor]) -> bool:
        if len(tensors) != len(self.refs):
            return False
        for t, r, (shape, dtype, device) in zip(tensors, self.refs, self.meta):
            if r() is not t or t.shape != shape or t.dtype != dtype or t.device != device:
                return False
        return True

    def same_values(self, tensors: list[Tensor]) -> bool:
        """Whether ``tensors`` (already known to pass :meth:`same_tensors`) hold the copied values."""
        if not tensors:
            return True
        if self.joined is not None:
            return _same_bytes(_flat(tensors), self.joined)
        return all(_same_bytes(t, c, r) for t, c, r in zip(tensors, self.copies, self.raw))

    def live(self) -> list[Tensor] | None:
        """The tensors themselves, if all alive and of their recorded shape, dtype and device."""
        tensors = [r() for r in self.refs]
        if any(t is None for t in tensors):
            return None
        return tensors if self.same_tensors(tensors) else None


def _stamp(t: Tensor) -> tuple:
    return t._version, t.data_ptr(), t.shape, t.stride(), t.dtype, t.device


def _owner(t: Tensor) -> Tensor:
    return t if t._base is None else t._base  # a slice is a new object each time; its base is not


class _Entry:
    __slots__ = ("value", "exact", "refs", "stamps", "generation", "trusted", "__weakref__")

    def __init__(self, value: Any, exact: list[Tensor], tracked: list[Tensor]) -> None:
        self.value = value
        self.exact = _Exact(exact)
        self.refs = [weakref.ref(_owner(t)) for t in tracked]
        self.stamps = [_stamp(t) for t in tracked]
        self.generation = _generation
        self.trusted = -1  # the eval pass (CheckGroup.scope) whose batched check it passed

    def same_tensors(self, exact: list[Tensor], tracked: list[Tensor]) -> bool:
        """Everything but the values of ``exact``: no kernel, no device sync."""
        if self.generation != _generation or len(tracked) != len(self.refs):
            return False
        for t, r, s in zip(tracked, self.refs, self.stamps):
            if r() is not _owner(t) or _stamp(t) != s:
                return False
        return self.exact.same_tensors(exact)


class EntryWatch:
    """The lookup checks of many entries at once (``FTNModel``'s eval view checks all of one
    task's entries, one per layer, once per pass), prepared when they are added and run as a few
    loops in C over flat lists rather than Python per entry: the same comparisons as
    :meth:`EvalCache.lookup` on the CPU. Each entry is still its cache's, the generation has not
    moved, ``tracked`` is the same tensor objects with the same stamp, and ``exact`` is the same
    tensor objects, of the same shape and dtype, contiguous, holding the copied values (one
    ``memcmp`` each). ``exact()`` and ``tracked()`` return the current tensors of all the
    entries, in the order they were added (re-read each pass: a replaced tensor is a change).
    Entries whose values are not compared by ``memcmp`` (off the CPU, joined copies) are refused
    by :meth:`add`: use lookups there."""

    __slots__ = ("exact", "tracked", "generation", "dicts", "keys", "entries", "refs", "stamps", "tensors",
                 "layouts", "addresses", "sizes")

    def __init__(self, exact: Callable[[], list[Tensor]], tracked: Callable[[], list[Tensor]]) -> None:
        self.exact, self.tracked = exact, tracked
        self.generation = _generation
        self.dicts: list[dict] = []  # each entry's cache's entries, and its key there
        self.keys: list[Any] = []
        self.entries: list[weakref.ref] = []  # weak: a dropped entry's value is freed, not kept here
        self.refs: list[weakref.ref] = []  # the tracked tensors (weak: W is large) and their stamps
        self.stamps: list[tuple] = []
        self.tensors: list[Tensor] = []  # the exact tensors, their (shape, dtype), their copies' buffers
        self.layouts: list[tuple] = []
        self.addresses: list[int] = []
        self.sizes: list[int] = []

    def add(self, cache: EvalCache, key: Any, exact: list[Tensor], tracked: list[Tensor]) -> weakref.ref | None:
        """Watch ``cache``'s entry for ``key``, whose current inputs are ``exact`` and ``tracked``
        (the next ones that ``exact()`` and ``tracked()`` return): a weak reference to the entry
        (its ``value`` is what the caller serves while :meth:`ok`), or None where it cannot (no
        valid entry, or its values are not compared by ``memcmp``). Weak, so that what drops the
        entry (``clear_cache``, ``train()``, ``.to()``, ``remove_task``) frees its value too."""
        entry = cache._entries.get(key)
        if (entry is None or entry.exact.joined is not None or any(r is None for r in entry.exact.raw)
                or not entry.same_tensors(exact, tracked) or self.generation != _generation):
            return None
        ref = weakref.ref(entry)
        self.dicts.append(cache._entries)
        self.keys.append(key)
        self.entries.append(ref)
        self.refs += [weakref.ref(t) for t in tracked]
        self.stamps += entry.stamps
        self.tensors += exact
        self.layouts += [(shape, dtype) for shape, dtype, _ in entry.exact.meta]
        self.addresses += [address for address, _ in entry.exact.raw]
        self.sizes += [size for _, size in entry.exact.raw]
        return ref

    def ok(self) -> bool:
        if self.generation != _generation:
            return False
        current = list(map(dict.get, self.dicts, self.keys))  # None where an entry was dropped
        if None in current or not all(map(operator.is_, current, map(operator.call, self.entries))):
            return False
        tracked = self.tracked()
        if len(tracked) != len(self.refs) or not all(map(operator.is_, tracked, map(operator.call, self.refs))):
            return False
        if list(map(_stamp, tracked)) != self.stamps:
            return False
        exact = self.exact()
        if len(exact) != len(self.tensors) or not all(map(operator.is_, exact, self.tensors)):
            return False
        if list(map(_layout, exact)) != self.layouts or not all(map(Tensor.is_contiguous, exact)):
            return False
        return not any(map(_MEMCMP, map(Tensor.data_ptr, exact), self.addresses, self.sizes))


_layout = operator.attrgetter("shape", "dtype")


class CheckGroup:
    """The caches of one model (one per :class:`~ftn.core.layers.TaskContext`), so that inside
    :func:`eval_pass` the values of all their batched entries are compared once, together."""

    def __init__(self) -> None:
        self._caches: weakref.WeakSet[EvalCache] = weakref.WeakSet()
        self.depth = 0  # open eval_pass blocks
        self.scope = 0  # the current (or last) eval pass
        self.checked: set[Any] = set()  # the keys whose entries this pass compared

    def check(self, key: Any) -> None:
        """Compare the values of every batched entry of the group under ``key`` (one task's
        weights in every layer) in one ``torch.equal`` per dtype and device (one device sync);
        if they all match, trust them for this pass. Per key, so a pass over one task does not
        pay for comparing every other task's entries too."""
        self.checked.add(key)
        batches: dict[tuple, list[tuple[_Entry, list[Tensor]]]] = {}
        for cache in list(self._caches):
            entry = cache._entries.get(key)
            if entry is not None:
                tensors = entry.exact.live() if entry.exact.batched else None
                if tensors and entry.generation == _generation:
                    joined = entry.exact.joined
                    batches.setdefault((joined.dtype, joined.device), []).append((entry, tensors))
        for items in batches.values():
            current = torch.cat([t.reshape(-1) for _, tensors in items for t in tensors])
            if torch.equal(current, torch.cat([entry.exact.joined for entry, _ in items])):
                for entry, _ in items:
                    entry.trusted = self.scope
            # else: a change somewhere; each entry of the batch is compared on its own at its lookup

    def __deepcopy__(self, memo: dict[int, Any]) -> CheckGroup:
        return type(self)()

    def __reduce__(self) -> tuple:
        return type(self), ()


@contextmanager
def eval_pass(group: CheckGroup | None) -> Iterator[None]:
    """One forward pass: on an accelerator, the entries of ``group`` are compared once (at the
    first lookup that needs it) instead of at every lookup. Changes made *inside* the block, e.g.
    by a forward hook, to inputs of entries already checked are not seen until the next pass."""
    if group is None or torch.compiler.is_compiling():
        # Compiled code never reads the eval cache (FTNLayer skips it), and counting passes on
        # the group there would make every call a recompilation (an integer attribute of a
        # module is a guard for torch.compile).
        yield
        return
    if group.depth == 0:
        group.scope += 1
        group.checked = set()
    group.depth += 1
    try:
        yield
    finally:
        group.depth -= 1


class EvalCache:
    """Entries by key (e.g. a task name); see the module docstring for when one is reused.

    Copies (``copy.deepcopy``, pickling) start empty: an entry belongs to the tensors it was
    built from.
    """

    def __init__(self) -> None:
        self._entries: dict[Any, _Entry] = {}

    def get(self, key: Any, build: Callable[[], Any], exact: Iterable[Tensor] = (),
            tracked: Iterable[Tensor] = (), training: bool = False, group: CheckGroup | None = None) -> Any:
        """``build()``, or the value it returned before for ``key`` if ``exact`` and ``tracked``
        are unchanged since (see the module docstring). Outside eval without autograd (or with
        ``training``) always ``build()``, and nothing is stored. ``group``: the caches whose
        values :func:`eval_pass` compares together."""
        if not caching_enabled(training):
            return build()
        exact, tracked = list(exact), list(tracked)
        value = self.lookup(key, exact, tracked, group)
        if value is not None:
            return value
        self._entries.pop(key, None)  # drop the stale value before building its replacement
        value = build()
        entry = self._entries[key] = _Entry(value, exact, tracked)
        if group is not None:
            group._caches.add(self)
            if group.depth > 0:
                entry.trusted = group.scope
        return value

    def lookup(self, key: Any, exact: list[Tensor], tracked: list[Tensor],
               group: CheckGroup | None = None) -> Any:
        """The entry's value if it may be served now (the same checks as :meth:`get`), else None;
        never builds. The caller must already know that caching is enabled
        (:func:`caching_enabled`): this is the eval fast path of the wrappers."""
        entry = self._entries.get(key)
        if entry is None or not entry.same_tensors(exact, tracked):
            return None
        in_pass = group is not None and group.depth > 0
        if in_pass and entry.exact.batched:
            if key not in group.checked:
                group.check(key)
            if entry.trusted == group.scope:
                return entry.value
        if entry.exact.same_values(exact):
            if in_pass:
                entry.trusted = group.scope
            return entry.value
        return None

    def pop(self, key: Any) -> None:
        self._entries.pop(key, None)

    def keys(self) -> list[Any]:
        return list(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Any) -> bool:
        return key in self._entries

    def __deepcopy__(self, memo: dict[int, Any]) -> EvalCache:
        return type(self)()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._entries = {}


class EvalCachedModule(nn.Module):
    """A module with an :class:`EvalCache` in ``_eval_cache``, emptied when its tensors move
    (``.to()``, ``.half()``: the entries would only hold memory) and on ``train()`` (training
    changes the inputs; the dense copies are not needed until the next eval)."""

    def __init__(self) -> None:
        super().__init__()
        self._eval_cache = EvalCache()

    def clear_cache(self, key: Any = None) -> None:
        """Drop this module's cached tensors, of ``key`` (a task) or all (to free memory, as a
        server bounding its cache does; for correctness see :func:`invalidate_eval_caches`)."""
        if key is None:
            self._eval_cache.clear()
        else:
            self._eval_cache.pop(key)

    def cached_tasks(self) -> list[Any]:
        """The keys (tasks) that have a cached entry."""
        return self._eval_cache.keys()

    def _apply(self, fn, recurse=True):
        self._eval_cache.clear()
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        if mode:
            self._eval_cache.clear()
        return super().train(mode)
