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

The stacked per-task tensors of a module (factors, W + ΔW, norm affines) are built once and
reused. Each task's slot is checked at every batch it appears in, with the eval cache's
comparisons (:mod:`ftn.core.cache`: the factors and norm tensors by identity and value, W by
identity, version and layout, the generation every ``optimizer.step()`` advances); any
difference rebuilds the stacks, so they are never stale. Tasks absent from a batch are not
checked (their slots are not read), and removing a task drops the stacks. A batch then costs a
fixed number of ops per layer: gathers by a per-row index, not a loop over tasks.

Anything else (training, autograd, attention composites, conv subclasses with their own
forward, padding modes other than zeros) returns None here and the caller runs each task on its
own slice (:class:`~ftn.core.layers.MixedTasks`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import cache as cache_module
from .cache import caching_enabled
from .updates import CPFactors, TaskUpdate

__all__ = ["mixed_layer_forward", "mixed_norm_forward", "drop_stacks", "FULL_WEIGHT_FACTOR"]

_CONV_FN: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
# A row's whole W + ΔW is gathered instead of adding the low-rank correction when gathering it
# (memory-bound, one read and write per weight element) costs less than this many FLOPs per
# element below the correction's FLOPs. Chosen from timings of MobileNetV2's and ResNet-18's 1×1
# and 3×3 layer shapes at 64 px, batch 32, 1 CPU thread (MobileNetV2's first 1×1 convs, 16-24
# channels on 32×32 / 16×16 maps: per-row weights 1.5-3x faster than conv + correction; its
# last ones on 2×2 maps and every ResNet-18 3×3 conv: the correction, 2-40x faster).
FULL_WEIGHT_FACTOR = 16
_SMALL_MAP = 8  # output positions per row below which a 1×1 correction runs as (P × R)·(R × C_out)


class _Inputs:
    """What slots of a stack were built from (one task's, or several tasks' joined), and the check
    that it still holds: the same tensor objects (factors, norm tensors), of the same shape, dtype
    and device, holding the same values (one ``memcmp`` per tensor against a copy on the CPU,
    ``torch.equal`` elsewhere): the comparisons of :class:`~ftn.core.cache.EvalCache`, run as
    C-level loops over all the batch's tasks at once (an ``EvalCache.lookup`` per task and module
    cost 11 µs, as much as a small layer's whole correction)."""

    __slots__ = ("exact", "layouts", "copies", "addresses", "sizes", "memcmp")

    def __init__(self, exact: list[Tensor], copies: list[Tensor] | None = None) -> None:
        self.exact = list(exact)
        self.layouts = list(map(_layout, exact))
        if copies is None:
            copies = [t.detach().clone(memory_format=torch.contiguous_format) for t in exact]
        self.copies = copies
        self.addresses = [c.data_ptr() for c in copies]
        self.sizes = [c.nbytes for c in copies]
        self.memcmp = _MEMCMP is not None and all(t.device.type == "cpu" and not t.is_complex() for t in exact)

    @classmethod
    def join(cls, parts: list[_Inputs]) -> _Inputs:
        return cls([t for p in parts for t in p.exact], [c for p in parts for c in p.copies])

    def same(self, exact: list[Tensor]) -> bool:
        if len(exact) != len(self.exact) or not all(map(operator.is_, exact, self.exact)):
            return False
        if list(map(_layout, exact)) != self.layouts:  # the devices too: memcmp stays on the CPU
            return False
        if self.memcmp and all(map(Tensor.is_contiguous, exact)):
            return not any(map(_MEMCMP, map(Tensor.data_ptr, exact), self.addresses, self.sizes))
        return all(map(torch.equal, exact, self.copies))


_layout = operator.attrgetter("shape", "dtype", "device")
_MEMCMP = cache_module._MEMCMP  # libc memcmp, or None where it cannot be loaded
_JOINED_KEPT = 32  # joined checks kept per module (one per set of tasks seen together)


def _stamp(t: Tensor) -> tuple:
    return t._version, t.data_ptr(), t.shape, t.stride(), t.dtype, t.device


class _Stacks:
    """One module's stacked per-task tensors: ``slots[task]`` indexes dim 0 of each of
    ``tensors``; slot ``len(slots)`` holds the frozen module (tasks it does not adapt).
    ``inputs[task]`` is what the task's slot was built from, ``tracked`` the frozen tensors (W)
    the stacks were built from with their ``stamps`` (identity, version, address, layout), and
    ``generation`` the eval caches' generation then (every ``optimizer.step()`` and
    ``invalidate_eval_caches`` advance it)."""

    __slots__ = ("kind", "slots", "tensors", "inputs", "joined", "tracked", "stamps", "generation", "key", "unit")

    def __init__(self, kind: str, key: Any) -> None:
        self.kind = kind
        self.key = key
        self.slots: dict[str, int] = {}
        self.tensors: tuple[Tensor, ...] = ()
        self.inputs: dict[str, _Inputs] = {}
        self.joined: dict[tuple, _Inputs] = {}  # by the batch's tasks: their inputs joined
        self.tracked: list[Tensor] = []
        self.stamps: list[tuple] = []
        self.generation = -1
        self.unit: dict[tuple, tuple[Tensor, Tensor]] = {}  # BatchNorm: zero mean, unit variance by size


def _state(module: nn.Module, kind: str, key: Any) -> _Stacks:
    """The module's stacks of ``kind``, new (empty) when its kind or key changed."""
    stacks = module.__dict__.get("_mixed_stacks")
    if stacks is None or stacks.kind != kind or stacks.key != key:
        stacks = module.__dict__["_mixed_stacks"] = _Stacks(kind, key)
    return stacks


def drop_stacks(module: nn.Module) -> None:
    """Forget ``module``'s stacks (a task was removed: free its slot's memory)."""
    module.__dict__.pop("_mixed_stacks", None)


def _current(stacks: _Stacks, present: list[str], exact: Callable[[str], list[Tensor]],
             tracked: list[Tensor] = ()) -> bool:
    """Whether the stacks hold the current values of every task in ``present`` and were built
    from the frozen ``tracked`` as they are. Tasks absent from the batch are not compared: their
    slots are not read."""
    if not stacks.tensors or stacks.generation != cache_module.current_generation():
        return False
    if tracked and (len(tracked) != len(stacks.tracked) or not all(map(operator.is_, tracked, stacks.tracked))
                    or list(map(_stamp, tracked)) != stacks.stamps):
        return False
    key = tuple(present)
    joined = stacks.joined.get(key)
    if joined is None:
        parts = [stacks.inputs.get(task) for task in present]
        if any(part is None for part in parts):
            return False
        if len(stacks.joined) >= _JOINED_KEPT:
            stacks.joined.clear()
        joined = stacks.joined[key] = _Inputs.join(parts)
    current: list[Tensor] = []
    for task in present:
        current += exact(task)
    return joined.same(current)


def _record(stacks: _Stacks, tasks: list[str], exact: Callable[[str], list[Tensor]],
            tracked: list[Tensor] = ()) -> None:
    """Record the inputs the stacks were just built from (all tasks, so that a later batch of
    other tasks finds them current)."""
    stacks.generation = cache_module.current_generation()
    stacks.inputs = {task: _Inputs(exact(task)) for task in tasks}
    stacks.joined = {}
    stacks.tracked = list(tracked)
    stacks.stamps = list(map(_stamp, tracked))


def _rows(mixed: Any, stacks: _Stacks, device: torch.device) -> Tensor:
    """Per-row slot index for this batch (shared by every module with the same slots)."""
    default = len(stacks.slots)
    return mixed.rows(tuple(stacks.slots.get(task, default) for task, _, _ in mixed.segments), device)


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
        stacks = _full_stacks(layer, present, mixed)
        if is_conv:
            return _conv_full(base, x, stacks, mixed, padding, one_by_one)
        return _linear_full(base, x, stacks, mixed)
    stacks = _lowrank_stacks(layer, present, mixed, one_by_one)
    if is_conv:
        return _conv_lowrank(base, x, stacks, mixed, padding, one_by_one, rank)
    return _linear_lowrank(base, x, stacks, mixed, rank)


def _conv_out(size: torch.Size, base: nn.Module, padding: tuple[int, ...]) -> list[int]:
    return [(s + 2 * p - d * (k - 1) - 1) // st + 1
            for s, p, d, k, st in zip(size, padding, base.dilation, base.kernel_size, base.stride)]


def _full_stacks(layer: Any, present: list[str], mixed: Any) -> _Stacks:
    """Stacks of W + ΔW per task (any update kind), slot ``len`` = W."""
    base = layer._modules["base"]
    weight = base.weight
    updates = layer._modules["tasks"]._modules
    stacks = _state(layer, "full", (weight.dtype, weight.device))

    def exact(task: str) -> list[Tensor]:
        return updates[task].tensors()

    if not _current(stacks, present, exact, [weight]):
        tasks = list(updates)
        stacks.slots = {t: i for i, t in enumerate(tasks)}
        stacks.tensors = (torch.stack([weight + updates[t].delta(weight.shape) for t in tasks] + [weight]),)
        _record(stacks, tasks, exact, [weight])
    return stacks


def _lowrank_stacks(layer: Any, present: list[str], mixed: Any, fold_kernel: bool) -> _Stacks:
    """Stacks of the CP factors per task, zero-padded to the layer's largest rank: A (S+1, C_out,
    R), Bᵀ (S+1, R, C_in) (times the kernel factor when it is a scalar per component: 1×1 convs)
    and, for convs, the kernel factor (S+1, R, k). Slot ``len`` is zero (the frozen layer)."""
    weight = layer._modules["base"].weight
    updates: dict[str, TaskUpdate] = layer._modules["tasks"]._modules
    stacks = _state(layer, "lowrank", (weight.dtype, weight.device, fold_kernel))

    def exact(task: str) -> list[Tensor]:
        return updates[task].tensors()

    if not _current(stacks, present, exact):
        # the CP tasks (another kind may sit in a task absent from this batch)
        tasks = [t for t in updates if isinstance(updates[t], CPFactors)]
        rank = max(updates[t].rank for t in tasks)
        pad = lambda f: F.pad(f, (0, rank - f.shape[1]))  # noqa: E731 - zero components add nothing
        factors = [[pad(f.to(weight.dtype)) for f in updates[t].tensors()] for t in tasks]
        a = torch.stack([f[0] for f in factors] + [torch.zeros_like(factors[0][0])])
        b = torch.stack([f[1] for f in factors] + [torch.zeros_like(factors[0][1])])
        if len(factors[0]) > 2:
            k = torch.stack([f[2] for f in factors] + [torch.zeros_like(factors[0][2])])
            if fold_kernel:
                b = b * k  # (S+1, C_in, R) * (S+1, 1, R): the 1×1 kernel factor is a scale per component
                stacks.tensors = (a, b.transpose(1, 2).contiguous())
            else:
                stacks.tensors = (a, b.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous())
        else:
            stacks.tensors = (a.transpose(1, 2).contiguous(), b)  # Linear: Aᵀ (S+1, R, out), B (S+1, in, R)
        stacks.slots = {t: i for i, t in enumerate(tasks)}
        _record(stacks, tasks, exact)
    return stacks


def _gather(stack: Tensor, rows: Tensor, rank: int | None = None, dim: int = 0) -> Tensor:
    """Per-row entries of ``stack`` (its first ``rank`` components along ``dim`` when given:
    the batch's tasks may all have a smaller rank than the layer's largest)."""
    if rank is not None and rank < stack.shape[dim]:
        stack = stack.narrow(dim, 0, rank)
    return stack.index_select(0, rows)


def _conv_lowrank(base: nn.Module, x: Tensor, stacks: _Stacks, mixed: Any, padding: tuple[int, ...],
                  one_by_one: bool, rank: int) -> Tensor:
    n, nd = x.shape[0], len(base.kernel_size)
    rows = _rows(mixed, stacks, x.device)
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


def _conv_full(base: nn.Module, x: Tensor, stacks: _Stacks, mixed: Any, padding: tuple[int, ...],
               one_by_one: bool) -> Tensor:
    n, nd = x.shape[0], len(base.kernel_size)
    rows = _rows(mixed, stacks, x.device)
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


def _linear_full(base: nn.Module, x: Tensor, stacks: _Stacks, mixed: Any) -> Tensor:
    n = x.shape[0]
    rows = _rows(mixed, stacks, x.device)
    weights = stacks.tensors[0].index_select(0, rows).transpose(1, 2)  # (N, in, out)
    flat = x.reshape(n, -1, x.shape[-1])
    y = torch.bmm(flat, weights) if base.bias is None else torch.baddbmm(base.bias, flat, weights)
    return y.reshape(*x.shape[:-1], -1)


def _linear_lowrank(base: nn.Module, x: Tensor, stacks: _Stacks, mixed: Any, rank: int) -> Tensor:
    n = x.shape[0]
    rows = _rows(mixed, stacks, x.device)
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
    stacks = _state(norm, "norm", (meta, x.device))

    def exact(task: str) -> list[Tensor]:
        return _norm_tensors(copies[task])

    if not _current(stacks, present, exact):
        tasks = [t for t, m in copies.items() if _norm_meta(m) == meta]
        affines = [_norm_affine(copies[t], kind) for t in tasks] + [_norm_affine(base, kind)]
        stacks.tensors = (torch.stack([s for s, _ in affines]), torch.stack([b for _, b in affines]))
        stacks.slots = {t: i for i, t in enumerate(tasks)}
        _record(stacks, tasks, exact)
    rows = _rows(mixed, stacks, x.device)
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
