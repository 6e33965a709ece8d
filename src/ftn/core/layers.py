"""FTN layers: a frozen Conv/Linear layer plus a per-task update of its weight.

A wrapper keeps the original module untouched as ``.base`` and, for each task, one update
(:mod:`ftn.core.updates`: CP factors of ΔW, a dense ΔW, or a gated dense ΔW). With task ``t`` active the layer computes ``base`` with weight ``W + ΔW_t``; with no task
active (or a task that does not adapt this layer) it *is* the original layer.

The weight is swapped rather than re-implemented: plain ``nn.Conv{1,2,3}d`` / ``nn.Linear`` go
through their own ``_conv_forward`` / ``F.linear``, and any subclass that overrides ``forward``
(e.g. a conv that pads "same" itself, as EfficientNet ports do) is run through
``torch.func.functional_call`` with only ``weight`` replaced, so it behaves exactly as before.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .cache import CheckGroup, EvalCachedModule
from .cp import weight_modes
from .errors import ShapeError, TaskError
from .functional import (_autocast_off, _cast, _compute_dtype, cp_add_grouped, cp_conv, cp_conv_recompute, cp_linear,
                         fast_backward_pays_off)
from .mixed import drop_stacks, mixed_layer_forward
from .recompute import OutputRecompute
from .updates import CPFactors, FactorInit, GatedDelta, TaskUpdate, full_rank, make_update

__all__ = [
    "TaskContext",
    "MixedTasks",
    "FactorInit",
    "CPFactors",
    "FTNLayer",
    "FTNConv",
    "FTNLinear",
    "BaseWrapper",
    "build_task_weights",
]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class TaskContext:
    """Which task is active. One instance is shared by every wrapper of a model, so switching
    task is a single assignment rather than a walk over all layers. ``checks`` groups the
    model's eval caches (:func:`ftn.core.cache.eval_pass`)."""

    __slots__ = ("active", "checks", "recompute", "weights")

    def __init__(self) -> None:
        self.active: str | MixedTasks | None = None
        self.checks = CheckGroup()
        self.recompute: OutputRecompute | None = None  # FTNModel.recompute_depthwise
        # (task, {layer: W + ΔW}) built for all layers at once for one training forward
        # (build_task_weights, set by FTNModel.forward); None outside it.
        self.weights: tuple[str, dict] | None = None


class MixedTasks:
    """A batch whose samples belong to different tasks, set as the active "task" by
    ``FTNModel.forward_mixed``. The batch is sorted by task once on entry, so each task's samples
    are one contiguous slice along dim 0 (``segments``: (task, start, length)).

    With ``grouped`` (eval without autograd) each wrapper that can runs the whole batch in one
    pass, each row with its own task's correction, affine or weight gathered by a per-row index
    (:mod:`ftn.core.mixed`); the others, and every wrapper in training, run each task once on
    its slice (a view, no copy) and concatenate (:meth:`apply`): total work equals one pass over
    the batch, and BatchNorm in train mode sees each task's own samples."""

    __slots__ = ("segments", "size", "grouped", "_rows")

    def __init__(self, segments: list[tuple[str, int, int]], grouped: bool = False) -> None:
        self.segments = segments
        self.size = sum(length for _, _, length in segments)
        self.grouped = grouped
        self._rows: dict[tuple, Tensor] = {}

    def rows(self, slots: tuple[int, ...], device: torch.device) -> Tensor:
        """The per-row index of a module whose tasks sit at ``slots`` (one per segment) in its
        stacks; made once per batch and reused by every module with the same slots."""
        key = (slots, device)
        rows = self._rows.get(key)
        if rows is None:
            index = [slot for slot, (_, _, length) in zip(slots, self.segments) for _ in range(length)]
            rows = self._rows[key] = torch.tensor(index, dtype=torch.long, device=device)
        return rows

    def apply(self, x: Tensor, fn) -> Tensor:
        """``torch.cat([fn(task, its slice of x) for each task])``."""
        if x.shape[0] != self.size:
            raise ShapeError(f"a mixed-task batch has {self.size} samples along dim 0, got a tensor "
                             f"of shape {tuple(x.shape)} (layers that move the batch dim are not supported)")
        return torch.cat([fn(task, x.narrow(0, start, length)) for task, start, length in self.segments])


class BaseWrapper(nn.Module):
    """A frozen module kept as ``.base`` inside a wrapper that stands in for it.

    Models often read a layer's attributes directly: Hugging Face ViT checks
    ``projection.weight.dtype``, others read ``in_features``, ``kernel_size`` or ``batch_first``.
    So any attribute the wrapper lacks is read from ``base`` (the one pass-through of the
    package); a subclass answers for the tensors it adapts through :meth:`_task_tensor`, so code
    that computes with them directly sees the active task's tensor.

    ``mixed_batches`` says whether ``forward`` understands a :class:`MixedTasks` batch
    (``FTNModel.forward_mixed``). A subclass that writes its own ``forward`` is assumed not to,
    unless it says so itself.
    """

    mixed_batches = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__ and "mixed_batches" not in cls.__dict__:
            cls.mixed_batches = False

    def _task_tensor(self, name: str) -> Tensor | None:
        """The active task's value of the adapted tensor ``name``, or None (read from ``base``)."""
        return None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        base = self.__dict__.get("_modules", {}).get("base")
        if base is None or name.startswith("__"):
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        value = self._task_tensor(name)
        return getattr(base, name) if value is None else value


class FTNLayer(BaseWrapper, EvalCachedModule):
    """Common machinery of the Conv and Linear wrappers; see the module docstring.

    ``fast_backward`` picks how a training step back-propagates into the factors (plain
    ``nn.Conv*d`` / ``nn.Linear`` bases only; see :mod:`ftn.core.functional`):

    - ``None`` (default): chosen per device. On the CPU, per layer, the custom thin-contraction
      backward where its estimated cost is well below the dense weight gradient
      (:func:`~ftn.core.functional.fast_backward_pays_off`), else the same custom Function in its
      dense mode (e.g. depthwise convs); neither keeps W + ΔW alive for the backward. On any other
      device (CUDA: launch-bound) plain autograd, with W + ΔW of all layers built together;
    - ``True``: always the custom backward; ``False``: always autograd (the "materialized" baseline).

    Set it on the class to change every layer, or on one instance.
    """

    fast_backward: bool | None = None
    # Whether a training output is recomputed in the backward rather than kept by the op that
    # consumes it (the BatchNorm after a depthwise conv); needs the model's OutputRecompute,
    # see FTNModel.recompute_depthwise. Conv layers on the custom Function only.
    recompute_output: bool = False
    mixed_batches = True  # forward runs each task of a MixedTasks batch on its slice

    def __init__(self, base: nn.Module, context: TaskContext | None = None, name: str = "") -> None:
        super().__init__()
        if not isinstance(getattr(base, "weight", None), Tensor):
            raise TypeError(f"{type(base).__name__} has no weight tensor to adapt")
        self.base = base
        base.requires_grad_(False)
        self.tasks = nn.ModuleDict()
        self.context = context if context is not None else TaskContext()
        self.layer_name = name or type(base).__name__
        self.modes = weight_modes(base.weight.shape)
        self.requested_ranks: dict[str, int] = {}  # what was asked, before any cap
        # The original forward is only bypassed for the exact built-in classes; subclasses keep
        # their own forward and get the new weight via functional_call.
        self._plain = type(base) in (*_CONV_TYPES, nn.Linear)

    # ---------------------------------------------------------------- transparency
    # ``weight`` answers with the *active task's* W + ΔW (differentiable), so code that computes
    # with it directly stays correct; other attributes come from ``base`` (BaseWrapper).
    @property
    def weight(self) -> Tensor:
        task = self.context.active
        if task is not None and task in self.tasks:
            return self.task_weight(task)
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    # ---------------------------------------------------------------- tasks
    def add_task(self, task: str, rank: int, init: FactorInit = FactorInit(),
                 requested_rank: int | None = None, update: Mapping[str, Any] | None = None) -> None:
        """Add ``task``'s update: rank-``rank`` CP factors, or ``update = {"kind": "dense"}`` /
        ``{"kind": "gated", "tau": ..}`` (:func:`ftn.core.updates.make_update`; rank is then ignored)."""
        if task in self.tasks:
            raise TaskError(f"layer {self.layer_name!r} already has task {task!r}")
        weight = self.base.weight
        options = dict(update or {})
        kind = options.pop("kind", "cp")
        if kind != "cp":
            rank = requested_rank = full_rank(self.modes)
        self.tasks[task] = make_update(kind, tuple(weight.shape), self.modes, rank, init, device=weight.device,
                                       dtype=weight.dtype, **options)
        self.requested_ranks[task] = requested_rank if requested_rank is not None else rank

    def remove_task(self, task: str) -> None:
        if task in self.tasks:
            del self.tasks[task]
        self.requested_ranks.pop(task, None)
        self._eval_cache.pop(task)
        drop_stacks(self)  # its slot in the mixed-batch stacks

    def rank(self, task: str) -> int:
        return self.tasks[task].rank if task in self.tasks else 0

    # ---------------------------------------------------------------- weights
    def delta_weight(self, task: str) -> Tensor:
        """ΔW for ``task`` in the base weight's shape (zeros if the task does not adapt this layer)."""
        if task not in self.tasks:
            return torch.zeros_like(self.base.weight)
        return self.tasks[task].delta(self.base.weight.shape)

    def task_weight(self, task: str) -> Tensor:
        """W + ΔW for ``task``. In eval mode without autograd it is built once and reused while
        the factors hold the same values and W is the same unchanged tensor
        (:class:`~ftn.core.cache.EvalCache`)."""
        factors = self.tasks[task]
        weight = self.base.weight
        return self._eval_cache.get(task, lambda: weight + factors.delta(weight.shape),
                                    exact=factors.tensors(), tracked=(weight,), training=self.training,
                                    group=self.context.checks)

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        active = self.context.active
        if type(active) is str and not (self.training or torch.is_grad_enabled()
                                        or torch.compiler.is_compiling()):
            # Eval fast path: a valid cached W + ΔW goes straight to the conv / linear.
            weight = self._cached_weight(active)
            if weight is not None:
                self._check_input(x)
                return self._forward_with_weight(x, weight)
        if isinstance(active, MixedTasks):
            if active.grouped and self._mixed_grouped():
                self._check_input(x)
                y = mixed_layer_forward(self, x, active)
                if y is not None:
                    return y
            return active.apply(x, self._forward_task)
        return self._forward_task(active, x)

    def _mixed_grouped(self) -> bool:
        """Whether a mixed batch may run this layer in one pass (:mod:`ftn.core.mixed`): the
        built-in wrappers of plain Conv / Linear modules, with ``task_weight`` not replaced (a
        subclass may compute more than base with W + ΔW, and a replaced ``task_weight`` is
        someone watching W + ΔW)."""
        return type(self) in (FTNConv, FTNLinear) and self._plain and "task_weight" not in self.__dict__

    def _cached_weight(self, task: str) -> Tensor | None:
        """The cached W + ΔW of ``task`` if the eval cache may serve it now (every check of
        :meth:`task_weight`), else None (not built here). Reads the submodules through
        ``_modules``: ``nn.Module.__getattr__`` costs a few µs per forward each."""
        factors = self._modules["tasks"]._modules.get(task)
        if factors is None:
            return None
        return self._eval_cache.lookup(task, factors.tensors(), [self._modules["base"].weight],
                                       self.context.checks)

    def _forward_task(self, task: str | None, x: Tensor) -> Tensor:
        prebuilt = self.context.weights
        if prebuilt is not None and prebuilt[0] == task:
            weight = prebuilt[1].get(self)
            if weight is not None:  # built with the other layers' (build_task_weights)
                self._check_input(x)
                return self._forward_prebuilt(x, weight)
        if task is None or task not in self.tasks:
            return self.base(x)
        update = self.tasks[task]
        if isinstance(update, GatedDelta) and not update.active and not torch.is_grad_enabled():
            return self.base(x)  # gate off, nothing to learn: exactly the frozen layer
        self._check_input(x)
        kind = self._backward_kind(update)
        if kind is not None:
            return self._fast_forward(x, update.tensors(), thin=kind == "thin")
        return self._forward_with_weight(x, self.task_weight(task))

    def _groupable(self, task: str) -> TaskUpdate | None:
        """The task's CP factors if this layer's W + ΔW may be built with other layers'
        (:func:`build_task_weights`): CP factors whose gradient goes through the dense weight
        gradient (not the thin contractions, which need the layer's input and output gradient),
        and a frozen W. A layer whose ``task_weight`` is replaced (by a subclass or on the
        instance, e.g. to watch W + ΔW) builds its weight itself, through that method, and so
        does one whose class writes its own ``forward`` (it would not read the built weight).
        Plain ``nn.Conv*d`` / ``nn.Linear`` bases only: a subclass's weight may be read by its
        parent module directly (``nn.MultiheadAttention``'s ``out_proj``), not through this
        forward, and a weight built for it would go unused."""
        cls = type(self)
        if ("task_weight" in self.__dict__ or cls.task_weight is not FTNLayer.task_weight
                or cls.forward is not FTNLayer.forward or not self._plain):
            return None
        update = self._modules["tasks"]._modules.get(task)
        if not isinstance(update, CPFactors) or self._modules["base"].weight.requires_grad:
            return None
        return update if self._backward_kind(update) != "thin" else None

    def _forward_prebuilt(self, x: Tensor, weight: Tensor) -> Tensor:
        """The training forward with W + ΔW from :func:`build_task_weights`."""
        return self._forward_with_weight(x, weight)

    def _use_fast_backward(self, factors: TaskUpdate) -> bool:
        """Whether a training forward takes the thin-contraction backward."""
        return self._backward_kind(factors) == "thin"

    def _backward_kind(self, factors: TaskUpdate) -> str | None:
        """How a training forward back-propagates into CP factors: ``"thin"`` (thin
        contractions), ``"dense"`` (the dense weight gradient contracted onto the factors, in the
        same custom Function: W + ΔW is rebuilt in the backward instead of being kept), or None
        (plain autograd through W + ΔW: dense and gated updates, ``fast_backward = False``,
        non-plain bases, eval)."""
        # CP factors only, where a backward will reach them (no point otherwise: eval then uses
        # the cached W + ΔW) and the base is frozen (the custom backward gives W no gradient).
        if not isinstance(factors, CPFactors):
            return None
        if not self._plain or self.fast_backward is False or not torch.is_grad_enabled():
            return None
        if self.base.weight.requires_grad or not any(f.requires_grad for f in factors.factors):
            return None
        if self.fast_backward is None:
            # Per device. On an accelerator a step at the batch sizes people use is bound by
            # launches, not arithmetic: the thin contractions' extra, smaller kernels made FTN's
            # step 1.15-1.62x plain autograd's on an H100 (docs/performance.md), and plain
            # autograd with the grouped W + ΔW build dispatches 1.13-1.30x full fine-tuning's ops.
            # On the CPU arithmetic bounds the step, and the thin contractions win by FLOPs.
            if self.base.weight.device.type != "cpu":
                return None
            pays = fast_backward_pays_off(self.base.weight.shape, factors.rank, self._groups(),
                                          getattr(self.base, "stride", ()))
            return "thin" if pays else "dense"
        return "thin"

    def _groups(self) -> int:
        return 1

    def _fast_forward(self, x: Tensor, factors: list[Tensor], thin: bool = True) -> Tensor:
        raise NotImplementedError

    def _forward_with_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        return functional_call(self.base, {"weight": weight}, (x,))

    def _check_input(self, x: Tensor) -> None:
        raise NotImplementedError

    def merged_module(self, task: str | None) -> nn.Module:
        """A copy of the base module with W + ΔW folded in: plain PyTorch, no ftn code."""
        merged = copy.deepcopy(self.base)
        if task is not None and task in self.tasks:
            with torch.no_grad():
                merged.weight = nn.Parameter(self.base.weight + self.delta_weight(task))
        merged.requires_grad_(True)
        return merged

    def extra_repr(self) -> str:
        ranks = {t: f.rank if f.kind == "cp" else f.kind for t, f in self.tasks.items()}
        return f"name={self.layer_name!r}, modes={self.modes}, ranks={ranks}"


class FTNConv(FTNLayer):
    """FTN wrapper of ``nn.Conv1d/2d/3d`` (and subclasses): 3-way CP over
    (C_out, C_in/groups, prod(kernel)); any stride, dilation, padding, padding_mode and groups."""

    def _check_input(self, x: Tensor) -> None:
        base = self._modules["base"]
        nd = len(base.kernel_size)
        if x.dim() not in (nd + 1, nd + 2) or x.shape[-(nd + 1)] != base.in_channels:
            spatial = ", ".join("HWD"[i] for i in range(nd)) if nd > 1 else "L"
            raise ShapeError(
                f"layer {self.layer_name!r} ({type(self.base).__name__}) expects input of shape "
                f"(N, {self.base.in_channels}, {spatial}), got {tuple(x.shape)}"
            )

    def _forward_with_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        if self._plain:
            base = self._modules["base"]
            return base._conv_forward(x, weight, base.bias)
        return super()._forward_with_weight(x, weight)

    def _groups(self) -> int:
        return self.base.groups

    def _forward_prebuilt(self, x: Tensor, weight: Tensor) -> Tensor:
        y = self._forward_with_weight(x, weight)
        recompute = self.context.recompute
        if self.recompute_output and recompute is not None and recompute.active and self._plain:
            # Rebuilt in the backward (outside autocast) as autocast ran it: the same conv on
            # the same, equally cast inputs, so bit for bit the output it replaces.
            base, dtype = self._modules["base"], _compute_dtype(x)
            weight = weight.detach()

            def rebuild() -> Tensor:
                with _autocast_off(x.device.type):
                    return base._conv_forward(_cast(x, dtype), _cast(weight, dtype), _cast(base.bias, dtype))
            recompute.mark(y, rebuild)
        return y

    def _fast_forward(self, x: Tensor, factors: list[Tensor], thin: bool = True) -> Tensor:
        base = self.base
        nd = len(base.kernel_size)
        padding = base.padding
        if base.padding_mode != "zeros" or isinstance(padding, str):
            # (left, right) pairs, last dim first, as nn.Conv*d computed them for F.pad.
            pads = base._reversed_padding_repeated_twice
            if base.padding_mode == "zeros" and all(pads[i] == pads[i + 1] for i in range(0, len(pads), 2)):
                padding = tuple(reversed(pads[::2]))  # symmetric "same": keep it inside the conv
            else:
                mode = "constant" if base.padding_mode == "zeros" else base.padding_mode
                x = F.pad(x, pads, mode=mode)
                padding = (0,) * nd
        unbatched = x.dim() == nd + 1
        if unbatched:
            x = x.unsqueeze(0)
        y = cp_conv(x, base.weight, base.bias, factors, base.stride, padding, base.dilation, base.groups,
                    thin=thin)
        recompute = self.context.recompute
        if self.recompute_output and recompute is not None and recompute.active and not unbatched:
            recompute.mark(y, cp_conv_recompute(x, base.weight, base.bias, factors, base.stride, padding,
                                                base.dilation, base.groups))
        return y.squeeze(0) if unbatched else y


class FTNLinear(FTNLayer):
    """FTN wrapper of ``nn.Linear`` (and subclasses): ΔW = A·Bᵀ."""

    def _check_input(self, x: Tensor) -> None:
        if x.dim() < 1 or x.shape[-1] != self._modules["base"].in_features:
            raise ShapeError(
                f"layer {self.layer_name!r} (Linear) expects input with last dimension "
                f"{self.base.in_features}, got shape {tuple(x.shape)}"
            )

    def _forward_with_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        if self._plain:
            return F.linear(x, weight, self._modules["base"].bias)
        return super()._forward_with_weight(x, weight)

    def _fast_forward(self, x: Tensor, factors: list[Tensor], thin: bool = True) -> Tensor:
        return cp_linear(x, self.base.weight, self.base.bias, factors, thin=thin)



def build_task_weights(layers: list[FTNLayer], task: str) -> dict[FTNLayer, Tensor]:
    """W + ΔW of ``task`` for every layer of ``layers`` that allows it (``FTNLayer._groupable``),
    built together: one call of :func:`~ftn.core.functional.cp_add_grouped` per rank, dtype and
    device, a fixed number of ops per group of equally shaped layers instead of about eight per
    layer (a training step at the batch sizes people use is bound by the ops it launches). Under
    autocast each group's W + ΔW is cast once, so the layers run the autocast dtype's weight
    without a cast each. The layers then run their base module with these weights; autograd
    takes the gradient through the dense weight gradient, as the per-layer path does."""
    classes: dict[tuple, list[tuple[FTNLayer, list[Tensor]]]] = {}
    for layer in layers:
        update = layer._groupable(task)
        if update is not None:
            factors = update.tensors()
            key = (update.rank, factors[0].dtype, factors[0].device, layer.base.weight.dtype)
            classes.setdefault(key, []).append((layer, factors))
    built: dict[FTNLayer, Tensor] = {}
    for (_, _, device, _), members in classes.items():
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        weights = cp_add_grouped([layer.base.weight for layer, _ in members], [f for _, f in members], dtype)
        built.update(zip((layer for layer, _ in members), weights))
    return built
