"""Mixed-task batches at backbone speed: the grouped eval path of ``FTNModel.forward_mixed``.

A batch whose rows belong to different tasks runs each adapted layer once for the whole batch,
whatever the number of tasks T in it (S-LoRA / Punica style), in eval mode without autograd:

- a conv (groups = 1) or Linear whose tasks hold CP factors runs the frozen W on the whole batch
  once and adds each row's own low-rank correction, from its task's factors gathered per row:
  ``u = Bᵀx`` (a 1×1 projection to the rank, one ``bmm``), the spatial factor as one depthwise
  conv over the rows' R channels (per-row kernels: one grouped conv over a (1, N·R, ...) view,
  with the layer's stride, padding and dilation; folded into B for 1×1 convs) and the
  projection back, ``A·v``, accumulated onto the base output (one ``baddbmm``). Ranks differ
  between tasks: the factors are zero-padded to the largest rank among the batch's tasks (zero
  components add exactly nothing);
- where the correction would cost more than running each row with its own W + ΔW (small
  layers on large maps: MobileNetV2's first 1×1 convs, where R·(C_in + C_out) is close to
  C_in·C_out), and for depthwise / grouped convs (whose kernels are tiny) and non-CP updates,
  each row's whole W + ΔW is gathered and the layer runs once as a per-row ``bmm`` (1×1 convs,
  Linear) or one grouped conv over a (1, N·C_in, ...) view (groups = N·g);
- a norm (eval BatchNorm, LayerNorm, GroupNorm, RMSNorm) normalises once and applies each row's
  task affine (BatchNorm: its running statistics folded into a per-row scale and shift).

The stacked per-task tensors of a module (factors, W + ΔW, norm affines) hold one slot per task,
written when the task is first in a batch or one of its inputs changed and freed when it is
removed: loading, evicting or changing one task costs that task's slots, whatever the number of
resident tasks. Each slot's inputs are eval-cache entries (:mod:`ftn.core.cache`: the factors and
norm tensors by identity and value, W by identity, version and layout, the generation every
``optimizer.step()`` advances), and all of one task's slots across the model are checked at once,
at the task's first module of each batch it is in (:class:`~ftn.core.cache.EntryWatch`: C loops
over flat lists, not a check per module); a failed check sends each module back to its own
checks, which rebuild only the slots that changed, so the stacks are never stale. Tasks absent
from a batch are not checked (their slots are not read). A batch then costs a fixed number of
ops per layer: gathers by a per-row index, not a loop over tasks.

Anything else (training, autograd, attention composites, conv subclasses with their own
forward, padding modes other than zeros) returns None here and the caller runs each task on its
own slice (:class:`~ftn.core.layers.MixedTasks`).
"""

from __future__ import annotations

import math
import operator
import weakref
from collections import Counter
from collections.abc import Callable
from functools import partial
from itertools import chain, repeat
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import cache as cache_module
from .cache import EntryWatch, EvalCache, caching_enabled
from .updates import CPFactors, TaskUpdate

__all__ = ["mixed_layer_forward", "mixed_norm_forward", "drop_stacks", "FULL_WEIGHT_FACTOR", "slot_builds"]

_CONV_FN: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
# A row's whole W + ΔW is gathered instead of adding the low-rank correction when gathering it
# (memory-bound, one read and write per weight element) costs less than this many FLOPs per
# element below the correction's FLOPs. Chosen from timings of MobileNetV2's and ResNet-18's 1×1
# and 3×3 layer shapes at 64 px, batch 32, 1 CPU thread (MobileNetV2's first 1×1 convs, 16-24
# channels on 32×32 / 16×16 maps: per-row weights 1.5-3x faster than conv + correction; its
# last ones on 2×2 maps and every ResNet-18 3×3 conv: the correction, 2-40x faster).
FULL_WEIGHT_FACTOR = 16
_SMALL_MAP = 8  # output positions per row below which a 1×1 correction runs as (P × R)·(R × C_out)


_MEMCMP = cache_module._MEMCMP  # libc memcmp, or None where it cannot be loaded
# An eval-cache entry keeps one joined copy of more than this many inputs of one dtype, which
# EntryWatch does not compare: a slot's inputs are split over entries of at most this many.
_CHUNK = 3
_FROZEN = object()  # the key of slot 0, the frozen module (tasks a module does not adapt)

slot_builds: Counter[str] = Counter()  # slots (re)built per task, all modules: what tests count


class _TaskWatch:
    """One task's slots in every module of a model, checked at once at the first module of each
    batch the task is in (:class:`~ftn.core.cache.EntryWatch`: one pass of C loops over all the
    slots' inputs rather than a check per module). A slot is trusted without its own check only
    while it is in the current ``watch``; a failed check starts an empty one, which the modules
    refill as each checks (and, if stale, rebuilds) its slot on its own."""

    __slots__ = ("task", "watch", "owners", "held", "readers", "bases", "batch")

    def __init__(self, task: str) -> None:
        self.task = task
        # per watched slot: the dict its task's update / norm copy sits in, that module, the
        # reader of its inputs; the frozen modules whose W a slot holds (W + ΔW)
        self.owners: list[dict] = []
        self.held: list[nn.Module] = []
        self.readers: list[Callable[[nn.Module], list[Tensor]]] = []
        self.bases: list[nn.Module] = []
        self.watch = EntryWatch(self._exact, self._tracked)
        self.batch: Any = None  # the MixedTasks batch this was last checked for

    def _exact(self) -> list[Tensor]:
        # C loops: each slot's module still the one in its dict, then all their inputs read
        if not all(map(operator.is_, map(dict.get, self.owners, repeat(self.task)), self.held)):
            return [None]  # a replaced or removed update: never equal to the watched tensors
        return list(chain.from_iterable(map(operator.call, self.readers, self.held)))

    def _tracked(self) -> list[Tensor]:
        return list(map(dict.get, map(_PARAMETERS, self.bases), repeat("weight")))


_PARAMETERS = operator.attrgetter("_parameters")
_NO_INPUTS: Callable[[Any], list[Tensor]] = lambda _: []  # noqa: E731 - the frozen W + ΔW slot: W is tracked
_TENSORS = operator.methodcaller("tensors")


# per model (its CheckGroup, weakly: TaskContext has no weak references) and task
_watches: weakref.WeakKeyDictionary[Any, dict[str, _TaskWatch]] = weakref.WeakKeyDictionary()


def _watch_ok(watch: EntryWatch) -> bool:
    return watch.ok()


_BATCH = object()  # the key, among a model's watches, of the current batch's watches by task


def _batch_watches(checks: Any, mixed: Any) -> dict[str, _TaskWatch]:
    """The watches of the batch's tasks, each checked once for this batch (looked up once per
    batch, not per module and task)."""
    watches = _watches.get(checks)
    batch = watches.get(_BATCH) if watches is not None else None
    if batch is None or batch[0] is not mixed:
        batch = (mixed, {task: _task_watch(checks, task, mixed) for task, _, _ in mixed.segments})
        _watches[checks][_BATCH] = batch
    return batch[1]


def _task_watch(checks: Any, task: str, mixed: Any) -> _TaskWatch:
    """The task's watch, checked once for this batch (a failed check empties it)."""
    watches = _watches.get(checks)
    if watches is None:
        watches = _watches[checks] = {}
    tw = watches.get(task)
    if tw is None:
        tw = watches[task] = _TaskWatch(task)
        tw.batch = mixed
    elif tw.batch is not mixed:
        tw.batch = mixed
        if not _watch_ok(tw.watch):
            tw = watches[task] = _TaskWatch(task)
            tw.batch = mixed
    return tw


class _Stacks:
    """One module's stacked per-task tensors of one kind: ``slots[task]`` indexes dim 0 of each
    of ``tensors``; slot 0 holds the frozen module (tasks it does not adapt). A slot is written
    when its task is added or changed, and freed when its task is removed: adding, changing or
    removing a task costs that task's slot, whatever the number of others (dim 0 grows by
    doubling, and a larger rank zero-pads the others in one copy). ``caches[i]`` holds, per task,
    the eval-cache entries of the inputs its slot was built from (at most ``_CHUNK`` each; the
    first's value is the slot), compared by the eval cache's rules; ``watched[task]`` the task
    watch and entries its slot was last added to."""

    __slots__ = ("kind", "key", "slots", "free", "tensors", "caches", "watched", "unit")

    def __init__(self, kind: str, key: Any) -> None:
        self.kind = kind
        self.key = key
        self.slots: dict[str, int] = {}
        self.free: list[int] = []
        self.tensors: tuple[Tensor, ...] = ()
        self.caches: list[EvalCache] = [EvalCache()]
        self.watched: dict[str, tuple] = {}
        self.unit: dict[tuple, tuple[Tensor, Tensor]] = {}  # BatchNorm: zero mean, unit variance by size

    # Copies (copy.deepcopy, pickling a model) start empty: slots belong to the tensors they were
    # built from, and the watches hold weak references, which cannot be pickled.
    def __deepcopy__(self, memo: dict[int, Any]) -> _Stacks:
        return type(self)(self.kind, self.key)

    def __reduce__(self) -> tuple:
        return type(self), (self.kind, self.key)


def _state(module: nn.Module, kind: str, key: Any, checks: Any) -> _Stacks:
    """The module's stacks of ``kind``, new (empty) when their key (dtype, device, ...) changed."""
    states = module.__dict__.get("_mixed_stacks")
    if states is None:
        states = module.__dict__["_mixed_stacks"] = {}
    stacks = states.get(kind)
    if stacks is None or stacks.key != key:
        if stacks is not None:
            _watches.pop(checks, None)  # their entries would only be compared for nothing
        stacks = states[kind] = _Stacks(kind, key)
    return stacks


def drop_stacks(module: nn.Module) -> None:
    """Free the slots of the tasks ``module`` no longer holds (a task was removed): the others
    keep theirs."""
    states = module.__dict__.get("_mixed_stacks")
    if not states:
        return
    held = module._modules["tasks"]._modules
    watches = _watches.get(getattr(module, "context", None) and module.context.checks)
    for stacks in states.values():
        for task in [t for t in stacks.slots if t not in held]:
            stacks.free.append(stacks.slots.pop(task))
            stacks.watched.pop(task, None)
            for cache in stacks.caches:
                cache.pop(task)
            if watches is not None:
                watches.pop(task, None)  # it holds the task's tensors; a new task starts afresh
                watches.pop(_BATCH, None)


def _write(stacks: _Stacks, slot: int, parts: tuple[Tensor, ...]) -> None:
    """Write ``parts`` into ``slot`` of the stacks (zero-padded to the stacks' shape; the stacks
    grow along dim 0 and along any dim a part exceeds, e.g. a larger rank)."""
    if not stacks.tensors:
        stacks.tensors = tuple(p.new_zeros((4, *p.shape)) for p in parts)
    grown = []
    for stack, part in zip(stacks.tensors, parts):
        shape = (max(stack.shape[0], 2 * slot if slot >= stack.shape[0] else 0),
                 *map(max, stack.shape[1:], part.shape))
        if tuple(shape) != tuple(stack.shape):
            bigger = stack.new_zeros(shape)
            bigger[tuple(slice(0, s) for s in stack.shape)] = stack
            stack = bigger
        target = stack[slot]
        if target.shape != part.shape:
            target.zero_()  # a freed slot's old values, past this part's rank
            target = target[tuple(slice(0, s) for s in part.shape)]
        target.copy_(part)
        grown.append(stack)
    stacks.tensors = tuple(grown)


def _watchable(tensors: list[Tensor]) -> bool:
    """Whether EntryWatch compares these inputs (memcmp: on the CPU, not complex)."""
    return _MEMCMP is not None and all(t.device.type == "cpu" and not t.is_complex() for t in tensors)


def _slot(stacks: _Stacks, task: Any, tw: _TaskWatch | None, owner: dict, reader: Callable[[Any], list[Tensor]],
          base: nn.Module | None, build: Callable[[Any], tuple[Tensor, ...]]) -> int:
    """``task``'s slot in the stacks, (re)built if any of its inputs (``reader(owner[task])``, and
    W when ``base`` is given) changed. Trusted without a check of its own while it is in the
    task's watch ``tw``, which passed its check for this batch."""
    first = stacks.caches[0]._entries.get(task)
    if tw is not None:
        held = stacks.watched.get(task)
        if held is not None and held[0] is tw.watch and held[1] is first:
            return first.value
    module = owner[task]
    tensors, frozen = reader(module), ([base._parameters["weight"]] if base is not None else [])
    chunks = [tensors[i:i + _CHUNK] for i in range(0, len(tensors), _CHUNK)] or [[]]
    while len(stacks.caches) < len(chunks):
        stacks.caches.append(EvalCache())
    if first is None or not all(cache.lookup(task, chunk, frozen if i == 0 else []) is not None
                                for i, (cache, chunk) in enumerate(zip(stacks.caches, chunks))):
        slot = stacks.slots.get(task) if task is not _FROZEN else 0
        if slot is None:
            slot = stacks.slots[task] = stacks.free.pop() if stacks.free else len(stacks.slots) + len(stacks.free) + 1
        _write(stacks, slot, build(task))
        if task is not _FROZEN:
            slot_builds[task] += 1
        for i, cache in enumerate(stacks.caches):
            cache.pop(task)
            if i < len(chunks):
                cache.get(task, lambda: slot, chunks[i], frozen if i == 0 else [])
        first = stacks.caches[0]._entries[task]
    if tw is not None and _watchable(tensors):
        for i, chunk in enumerate(chunks):
            tw.watch.add(stacks.caches[i], task, chunk, frozen if i == 0 else [])
        tw.owners.append(owner)
        tw.held.append(module)
        tw.readers.append(reader)
        if base is not None:
            tw.bases.append(base)
        stacks.watched[task] = (tw.watch, first)
    return first.value


def _row_slots(stacks: _Stacks, mixed: Any, checks: Any, present: list[str], owner: dict,
               reader: Callable[[Any], list[Tensor]], base: nn.Module | None,
               build: Callable[[Any], tuple[Tensor, ...]], frozen: Callable[[Any], tuple[Tensor, ...]] | None,
               frozen_module: nn.Module | None = None, frozen_reader: Callable[[Any], list[Tensor]] | None = None,
               ) -> tuple[int, ...]:
    """Each segment's slot (current); for tasks the module does not adapt, the frozen slot 0
    (built by ``frozen`` from ``frozen_module``, whose inputs ``frozen_reader`` reads, or zero
    where ``frozen`` is None)."""
    slots = []
    watches = _batch_watches(checks, mixed)
    for task, _, _ in mixed.segments:
        if task in present:
            slots.append(_slot(stacks, task, watches[task], owner, reader, base, build))
        elif frozen is None:
            slots.append(0)
        else:
            slots.append(_slot(stacks, _FROZEN, None, {_FROZEN: frozen_module}, frozen_reader or reader, base, frozen))
    return tuple(slots)


# --------------------------------------------------------------------------- conv / Linear
def _conv_padding(base: nn.Module) -> tuple[int, ...] | None:
    """Numeric padding of a zero-padded conv (a symmetric "same" included), else None."""
    if base.padding_mode != "zeros":
        return None
    padding = base.padding
    if isinstance(padding, str):
        pads = base._reversed_padding_repeated_twice
        if any(pads[i] != pads[i + 1] for i in range(0, len(pads), 2)):
            return None
        padding = tuple(reversed(pads[::2]))
    return tuple(padding)


def _full_pays(weight: Tensor, rank: int, rows_out: int, rows_in: int) -> bool:
    """Whether gathering each row's whole W + ΔW beats the low-rank correction: ``rows_out`` /
    ``rows_in`` are the output / input positions per sample (1 for a plain Linear)."""
    c_out, c_in = weight.shape[0], weight.shape[1]
    kernel = math.prod(weight.shape[2:])
    correction = rank * (c_in * rows_in + kernel * rows_out + c_out * rows_out)
    return weight.numel() * FULL_WEIGHT_FACTOR < correction


def mixed_layer_forward(layer: Any, x: Tensor, mixed: Any) -> Tensor | None:
    """``layer`` (an :class:`~ftn.core.layers.FTNConv` / ``FTNLinear`` of a plain module) on a
    mixed-task batch in one pass, or None where the grouped path does not apply."""
    base = layer._modules["base"]
    if layer.training or not caching_enabled() or x.shape[0] != mixed.size or x.dim() < 2:
        return None
    updates = layer._modules["tasks"]._modules
    present = [task for task, _, _ in mixed.segments if task in updates]
    if not present:
        return base(x)  # no task of the batch adapts it: the frozen layer for every row
    weight = base.weight
    is_conv = weight.dim() > 2
    if is_conv:
        nd = len(base.kernel_size)
        padding = _conv_padding(base)
        if padding is None or x.dim() != nd + 2:
            return None
    cp = all(isinstance(updates[t], CPFactors) for t in present)
    rank = max((updates[t].rank for t in present), default=0) if cp else 0
    if is_conv:
        rows_out = math.prod(_conv_out(x.shape[2:], base, padding))
        one_by_one = all(k == 1 for k in base.kernel_size) and not any(padding)
        rows_in = rows_out if one_by_one else math.prod(x.shape[2:])
        grouped = base.groups != 1
    else:
        rows_out = rows_in = math.prod(x.shape[1:-1])
        grouped = one_by_one = False
    if not cp or grouped or _full_pays(weight, rank, rows_out, rows_in):
        stacks, slots = _full_rows(layer, present, mixed)
        rows = mixed.rows(slots, x.device)
        if is_conv:
            return _conv_full(base, x, stacks, rows, padding, one_by_one)
        return _linear_full(base, x, stacks, rows)
    stacks, slots = _lowrank_rows(layer, present, mixed, one_by_one)
    rows = mixed.rows(slots, x.device)
    if is_conv:
        return _conv_lowrank(base, x, stacks, rows, padding, one_by_one, rank)
    return _linear_lowrank(base, x, stacks, rows, rank)


def _conv_out(size: torch.Size, base: nn.Module, padding: tuple[int, ...]) -> list[int]:
    return [(s + 2 * p - d * (k - 1) - 1) // st + 1
            for s, p, d, k, st in zip(size, padding, base.dilation, base.kernel_size, base.stride)]


def _full_rows(layer: Any, present: list[str], mixed: Any) -> tuple[_Stacks, tuple[int, ...]]:
    """Stacks of W + ΔW per task (any update kind), slot 0 = W; and each segment's slot."""
    base = layer._modules["base"]
    weight = base.weight
    updates = layer._modules["tasks"]._modules
    checks = layer.context.checks
    stacks = _state(layer, "full", (weight.dtype, weight.device), checks)
    build = lambda task: (weight + updates[task].delta(weight.shape),)  # noqa: E731
    slots = _row_slots(stacks, mixed, checks, present, updates, _TENSORS, base, build, lambda _: (weight,), base,
                       _NO_INPUTS)
    return stacks, slots


def _lowrank_parts(updates: dict, dtype: torch.dtype, fold_kernel: bool, task: str) -> tuple[Tensor, ...]:
    """One task's slot of the low-rank stacks: A (C_out, R), Bᵀ (R, C_in) (times the kernel factor
    when it is a scalar per component: 1×1 convs) and, for convs, the kernel factor (R, k);
    for Linear Aᵀ (R, out), B (in, R)."""
    factors = [f.to(dtype) for f in updates[task].tensors()]
    if len(factors) > 2:
        a, b, k = factors
        if fold_kernel:
            return a, (b * k).t().contiguous()  # (C_in, R) * (1, R): the 1×1 kernel factor scales each component
        return a, b.t().contiguous(), k.t().contiguous()
    a, b = factors
    return a.t().contiguous(), b


def _lowrank_rows(layer: Any, present: list[str], mixed: Any, fold_kernel: bool) -> tuple[_Stacks, tuple[int, ...]]:
    """Stacks of the CP factors per task, zero-padded to the largest rank among the tasks they
    hold (zero components add exactly nothing): A (S, C_out, R), Bᵀ (S, R, C_in), and for convs
    without a folded kernel, the kernel factor (S, R, k). Slot 0 is zero (the frozen layer)."""
    weight = layer._modules["base"].weight
    updates: dict[str, TaskUpdate] = layer._modules["tasks"]._modules
    checks = layer.context.checks
    stacks = _state(layer, "lowrank", (weight.dtype, weight.device, fold_kernel), checks)
    slots = _row_slots(stacks, mixed, checks, present, updates, _TENSORS, None,
                       partial(_lowrank_parts, updates, weight.dtype, fold_kernel), None)
    return stacks, slots


def _gather(stack: Tensor, rows: Tensor, rank: int | None = None, dim: int = 0) -> Tensor:
    """Per-row entries of ``stack`` (its first ``rank`` components along ``dim`` when given:
    the batch's tasks may all have a smaller rank than the layer's largest)."""
    if rank is not None and rank < stack.shape[dim]:
        stack = stack.narrow(dim, 0, rank)
    return stack.index_select(0, rows)


def _conv_lowrank(base: nn.Module, x: Tensor, stacks: _Stacks, rows: Tensor, padding: tuple[int, ...],
                  one_by_one: bool, rank: int) -> Tensor:
    n, nd = x.shape[0], len(base.kernel_size)
    y = base._conv_forward(x, base.weight, base.bias)
    if one_by_one:
        a, bt = stacks.tensors
        if any(s != 1 for s in base.stride):
            x = x[(slice(None), slice(None), *(slice(None, None, s) for s in base.stride))]
    else:
        a, bt, k = stacks.tensors
    flat, bt = x.reshape(n, x.shape[1], -1), _gather(bt, rows, rank, 1)  # (N, C_in, P), (N, R, C_in)
    y_flat, a = y.reshape(n, y.shape[1], -1), _gather(a, rows, rank, 2)  # (N, C_out, P'), (N, C_out, R)
    small = y_flat.shape[-1] < _SMALL_MAP and one_by_one
    # u = Bᵀx, the 1×1 projection to the rank (as (P, R) per row on small maps, see below)
    u = torch.bmm(flat.transpose(1, 2), bt.transpose(1, 2)) if small else torch.bmm(bt, flat)
    if not one_by_one:  # the spatial factor: one depthwise conv over the rows' R channels
        kernel = _gather(k, rows, rank, 1).reshape(-1, 1, *base.kernel_size)  # (N·R, 1, kh, kw)
        u = _CONV_FN[nd](u.reshape(1, -1, *x.shape[2:]), kernel, None, base.stride, padding, base.dilation,
                         kernel.shape[0]).reshape(n, -1, y_flat.shape[-1])
    if small:
        # A few positions per row (the last stages' 2×2 maps): as (P × R)·(R × C_out) products
        # the batched GEMMs have long rows; as (C_out × R)·(R × P) MKL ran them 2-4x slower.
        return torch.baddbmm(y_flat.transpose(1, 2), u, a.transpose(1, 2)).transpose(1, 2).reshape(y.shape)
    return torch.baddbmm(y_flat, a, u).reshape(y.shape)


def _conv_full(base: nn.Module, x: Tensor, stacks: _Stacks, rows: Tensor, padding: tuple[int, ...],
               one_by_one: bool) -> Tensor:
    n, nd = x.shape[0], len(base.kernel_size)
    weights = stacks.tensors[0].index_select(0, rows)  # (N, C_out, C_in/g, *k)
    if one_by_one and base.groups == 1:
        if any(s != 1 for s in base.stride):
            x = x[(slice(None), slice(None), *(slice(None, None, s) for s in base.stride))]
        w = weights.reshape(n, weights.shape[1], -1)
        flat = x.reshape(n, x.shape[1], -1)
        y = torch.bmm(w, flat) if base.bias is None else torch.baddbmm(base.bias[:, None], w, flat)
        return y.reshape(n, -1, *x.shape[2:])
    y = _CONV_FN[nd](x.reshape(1, -1, *x.shape[2:]), weights.reshape(-1, *weights.shape[2:]), None, base.stride,
                     padding, base.dilation, n * base.groups)
    y = y.reshape(n, -1, *y.shape[2:])
    if base.bias is not None:
        y = y + base.bias.reshape(-1, *([1] * nd))
    return y


def _linear_full(base: nn.Module, x: Tensor, stacks: _Stacks, rows: Tensor) -> Tensor:
    n = x.shape[0]
    weights = stacks.tensors[0].index_select(0, rows).transpose(1, 2)  # (N, in, out)
    flat = x.reshape(n, -1, x.shape[-1])
    y = torch.bmm(flat, weights) if base.bias is None else torch.baddbmm(base.bias, flat, weights)
    return y.reshape(*x.shape[:-1], -1)


def _linear_lowrank(base: nn.Module, x: Tensor, stacks: _Stacks, rows: Tensor, rank: int) -> Tensor:
    n = x.shape[0]
    at, b = stacks.tensors
    y = F.linear(x, base.weight, base.bias)
    u = torch.bmm(x.reshape(n, -1, x.shape[-1]), _gather(b, rows, rank, 2))  # (N, L, R)
    return torch.baddbmm(y.reshape(n, -1, y.shape[-1]), u, _gather(at, rows, rank, 1)).reshape(y.shape)


# --------------------------------------------------------------------------- norms
def _norm_meta(module: nn.Module) -> tuple:
    """What a norm computes with besides its tensors, read from its ``__dict__`` (cheap: this runs
    per norm and task at every batch); two norms of equal meta run the same function of their
    tensors."""
    d = module.__dict__
    params, buffers = d["_parameters"], d["_buffers"]
    return (type(module), d["training"], d.get("eps"), d.get("normalized_shape"), d.get("num_groups"),
            d.get("track_running_stats"), params.get("weight") is None, params.get("bias") is None,
            buffers.get("running_mean") is None)


def _norm_kind(module: nn.Module, meta: tuple) -> str | None:
    if isinstance(module, _BatchNorm):
        if meta[1] or not meta[5] or meta[8]:
            return None  # batch statistics (train mode, none tracked): per task, on its own rows
        return "bn"
    if type(module) is nn.LayerNorm:
        return "ln"
    if type(module) is nn.GroupNorm:
        return "gn"
    if type(module) is getattr(nn, "RMSNorm", None):
        return "rms"
    return None


def _norm_tensors(module: nn.Module) -> list[Tensor]:
    """The tensors the norm computes with (its slot's inputs), read from its dicts."""
    d = module.__dict__
    params, buffers = d["_parameters"], d["_buffers"]
    tensors = [params.get("weight"), params.get("bias"), buffers.get("running_mean"), buffers.get("running_var")]
    return [t for t in tensors if t is not None]


def _norm_affine(module: nn.Module, kind: str) -> tuple[Tensor, Tensor]:
    """(scale, shift) of the norm, applied after an affine-free normalisation (for BatchNorm in
    eval: its running statistics folded in, so the scale and shift are the whole norm)."""
    weight, bias = module.weight, getattr(module, "bias", None)
    if kind == "bn":
        scale = torch.rsqrt(module.running_var + module.eps)
        if weight is not None:
            scale = scale * weight
        shift = -module.running_mean * scale
        return scale, shift if bias is None else shift + bias
    shape = module.normalized_shape if kind in ("ln", "rms") else (module.num_channels,)
    ref = next((t for t in (weight, bias) if t is not None), None)
    ones = torch.ones(shape, dtype=ref.dtype if ref is not None else None,
                      device=ref.device if ref is not None else None)
    return (weight if weight is not None else ones), (bias if bias is not None else torch.zeros_like(ones))


def mixed_norm_forward(norm: Any, x: Tensor, mixed: Any) -> Tensor | None:
    """A :class:`~ftn.core.norms.TaskNorm` on a mixed-task batch in one pass (each row's task
    affine gathered per row), or None where the grouped path does not apply."""
    if norm.training or not caching_enabled() or x.shape[0] != mixed.size or x.dim() < 2:
        return None
    copies = norm._modules["tasks"]._modules
    base = norm._modules["base"]
    meta = _norm_meta(base)
    kind = _norm_kind(base, meta)
    if kind is None:
        return None
    present = [task for task, _, _ in mixed.segments if task in copies]
    if any(_norm_meta(copies[task]) != meta for task in present):
        return None  # a task's copy in train mode, or of another configuration: per task
    checks = norm.context.checks
    dtype = next((t.dtype for t in _norm_tensors(base)), None)  # the stacks' (affines of another dtype: new ones)
    stacks = _state(norm, "norm", (meta, x.device, dtype), checks)
    slots = _row_slots(stacks, mixed, checks, present, copies, _norm_tensors, None,
                       lambda task: _norm_affine(copies[task], kind), lambda _: _norm_affine(base, kind), base)
    rows = mixed.rows(slots, x.device)
    scale, shift = (t.index_select(0, rows) for t in stacks.tensors)
    if kind == "bn":
        # The native BatchNorm kernel over a (1, N·C, ...) view, with zero mean, unit variance and
        # eps 0 and the per-row scale and shift as its affine: x·scale + shift in one fused pass
        # (a broadcast addcmul took 2.3x as long on MobileNetV2's maps, 1 CPU thread).
        size = scale.numel()
        unit = stacks.unit.get((size, scale.dtype))
        if unit is None:
            unit = stacks.unit[(size, scale.dtype)] = (scale.new_zeros(size), scale.new_ones(size))
        flat = x.reshape(1, size, *x.shape[2:])
        return F.batch_norm(flat, unit[0], unit[1], scale.reshape(-1), shift.reshape(-1), False, 0.0,
                            0.0).reshape(x.shape)
    if kind == "ln":
        normalized = F.layer_norm(x, base.normalized_shape, None, None, base.eps)
    elif kind == "rms":
        normalized = F.rms_norm(x, base.normalized_shape, None, base.eps)
    elif kind == "gn":
        normalized = F.group_norm(x, base.num_groups, None, None, base.eps)
    else:
        normalized = x
    if kind in ("ln", "rms"):
        # (N, *normalized_shape) → (N, 1, ..., *normalized_shape): broadcast over the middle dims
        view = (x.shape[0], *([1] * (x.dim() - 1 - scale.dim() + 1)), *scale.shape[1:])
    else:
        view = (x.shape[0], scale.shape[1], *([1] * (x.dim() - 2)))
    return torch.addcmul(shift.reshape(view), normalized, scale.reshape(view))
