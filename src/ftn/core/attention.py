"""FTN for the ways attention is written: packed projections, ``nn.MultiheadAttention``, per-task biases.

Plain ``nn.Linear`` q/k/v/o projections and MLPs (BERT, Hugging Face ViT, torchvision ViT's MLP)
need nothing here: :class:`~ftn.core.layers.FTNLinear` wraps them. This module adds

- :class:`FTNMultiheadAttention`: ``nn.MultiheadAttention`` keeps its input projection as a raw
  parameter (``in_proj_weight``) and ``F.multi_head_attention_forward`` reads ``out_proj.weight``
  directly, so wrapping its children would be bypassed. The wrapper keeps the MHA untouched as
  ``.base`` and runs it through ``torch.func.functional_call`` with ``in_proj_weight`` (or
  ``q/k/v_proj_weight``) and ``out_proj.weight`` replaced by W + ΔW: PyTorch's own forward,
  fast path included, runs unchanged.
- :class:`FTNFusedLinear`: a fused ``qkv`` Linear (timm ViT) factorized per projection: the
  output rows are split into q, k and v, each with its own A·Bᵀ of the task's rank.
- :class:`FTNBiasLinear` and :class:`TaskBias`: a per-task copy of the bias of an adapted Linear.

Design: each adapted *weight* (or weight slice) is an :class:`FTNProjection`, a genuine
:class:`~ftn.core.layers.FTNLayer` whose ``base`` is a read-only :class:`WeightView` on the frozen
tensor (not registered as a parameter, so nothing is counted or saved twice). So ``FTNModel``,
adapter files and parameter reports see ordinary 2-way layers named ``<mha>.in_proj`` (or
``<mha>.q_proj``/``k_proj``/``v_proj``) and ``<mha>.out_proj``, or ``<qkv>.q``/``.k``/``.v``,
and include/exclude/rank patterns select them individually. Per-task biases are a
:class:`~ftn.core.norms.TaskNorm` subclass (a per-task copy of a small frozen module), so adapter
files, ``task_parameters`` and the report handle them as they handle norms (they are counted in
the report's ``norms`` column). Each wrapper's ``merged_module(task)`` is the plain PyTorch
module that ``FTNModel.merge`` puts in its place. :mod:`ftn.core.injection` decides which wrapper
goes where; this module only defines them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .cache import EvalCachedModule
from .errors import ConfigError
from .layers import BaseWrapper, FTNLayer, FTNLinear, TaskContext
from .norms import TaskNorm

__all__ = [
    "WeightView",
    "FTNProjection",
    "TaskBias",
    "FTNBiasLinear",
    "FTNFusedLinear",
    "FTNMultiheadAttention",
]


# ---------------------------------------------------------------------------- building blocks
class WeightView(nn.Module):
    """A read-only window (optionally rows ``start:stop``) on a tensor owned by another module.

    The owner is kept in ``__dict__``, not as a submodule, and ``weight`` is read live, so the
    frozen tensor stays registered once (where it was) and moves with ``.to()`` of the owner.
    """

    def __init__(self, owner: nn.Module, path: str, rows: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.__dict__["_owner"] = owner
        self.path = path
        self.rows = rows

    @property
    def weight(self) -> Tensor:
        tensor = self._owner.get_parameter(self.path)
        return tensor if self.rows is None else tensor[self.rows[0]:self.rows[1]]

    def extra_repr(self) -> str:
        rows = "" if self.rows is None else f"[{self.rows[0]}:{self.rows[1]}]"
        return f"{self.path}{rows}, shape={tuple(self.weight.shape)}"


class FTNProjection(FTNLayer):
    """ΔW factors for one weight (or row block of a weight) that its owner wrapper applies.

    A full :class:`~ftn.core.layers.FTNLayer` (tasks, ranks, caps, adapter files) whose ``base`` is a
    :class:`WeightView`; it is never called itself: :class:`FTNFusedLinear` and
    :class:`FTNMultiheadAttention` read ``task_weight(task)`` from it.
    """

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - guarded misuse
        raise RuntimeError(f"{self.layer_name!r} is applied by the module that owns it, not called")

    def merged_module(self, task: str | None) -> nn.Module:  # pragma: no cover - guarded misuse
        raise RuntimeError(f"{self.layer_name!r} is merged by the module that owns it")


class _Bias(nn.Module):
    def __init__(self, bias: nn.Parameter) -> None:
        super().__init__()
        self.bias = bias


class TaskBias(TaskNorm):
    """A frozen bias plus one trainable copy per task.

    Built on :class:`~ftn.core.norms.TaskNorm` (a per-task copy of a small frozen module): adapter
    files store it as ``norm.<layer>.bias``, ``task_parameters`` returns it, the parameter
    report counts it in ``norms`` and ``frozen_tensors`` leaves it out of the backbone. The base
    holds the very same Parameter object as the wrapped layer, so nothing is counted twice.
    """

    def __init__(self, bias: nn.Parameter, context: TaskContext | None = None, name: str = "") -> None:
        super().__init__(_Bias(bias), context, name)

    def bias_for(self, task: str | None) -> Tensor:
        return self.task_module(task).bias

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - guarded misuse
        raise RuntimeError(f"{self.layer_name!r} is applied by the layer that owns it, not called")


class FTNBiasLinear(FTNLinear):
    """:class:`~ftn.core.layers.FTNLinear` whose bias is task-specific too (``train_bias=True``)."""

    @property
    def bias(self) -> Tensor:
        return self.task_bias.bias_for(self.context.active)

    def __init__(self, base: nn.Linear, context: TaskContext | None = None, name: str = "") -> None:
        super().__init__(base, context, name)
        if base.bias is None:
            raise ConfigError(f"{name!r} has no bias to make task-specific")
        self.task_bias = TaskBias(base.bias, self.context, f"{self.layer_name}.bias")

    def forward(self, x: Tensor) -> Tensor:
        task = self.context.active
        has_weight = task is not None and task in self.tasks
        has_bias = task is not None and task in self.task_bias.tasks
        if not (has_weight or has_bias):
            return self.base(x)
        self._check_input(x)
        weight = self.task_weight(task) if has_weight else self.base.weight
        bias = self.task_bias.bias_for(task)
        if self._plain:
            return F.linear(x, weight, bias)
        return functional_call(self.base, {"weight": weight, "bias": bias}, (x,))

    def merged_module(self, task: str | None) -> nn.Module:
        merged = super().merged_module(task)
        if task is not None and task in self.task_bias.tasks:
            merged.bias = nn.Parameter(self.task_bias.bias_for(task).detach().clone())
        return merged


# ---------------------------------------------------------------------------- composites
class _Composite(BaseWrapper, EvalCachedModule):
    """A frozen module plus FTNProjection parts (and TaskBias stores) for some of its tensors.

    ``_segments[path]`` lists, for the parameter ``path`` of ``base``, the part keys whose
    blocks make it up, in row order (``(key, rows)``); a key with no part (deselected by the
    patterns) uses the frozen rows. ``_bias_paths[key]`` is the parameter a bias store replaces.
    """

    mixed_batches = False  # forward_mixed does not split batches through functional_call yet

    def __init__(self, base: nn.Module, context: TaskContext, name: str) -> None:
        super().__init__()
        self.base = base  # registered first, so frozen tensors keep their names under `base.`
        base.requires_grad_(False)
        self.parts = nn.ModuleDict()
        self.biases = nn.ModuleDict()
        self.context = context
        self.layer_name = name
        self._segments: dict[str, list[tuple[str, tuple[int, int] | None]]] = {}
        self._bias_paths: dict[str, str] = {}
        self._bias_paths_inv: dict[str, str] = {}

    def _add_segment(self, path: str, key: str, rows: tuple[int, int] | None, name: str,
                     selected: Callable[[str], bool]) -> None:
        self._segments.setdefault(path, []).append((key, rows))
        if selected(name):
            self.parts[key] = FTNProjection(WeightView(self.base, path, rows), self.context, name)

    def _add_bias(self, key: str, path: str, name: str) -> None:
        bias = self.base.get_parameter(path) if _has_parameter(self.base, path) else None
        if bias is not None:
            self.biases[key] = TaskBias(bias, self.context, name)
            self._bias_paths[key] = path
            self._bias_paths_inv[path] = key

    def adapts(self, task: str | None) -> bool:
        return task is not None and (any(task in p.tasks for p in self.parts.values())
                                     or any(task in b.tasks for b in self.biases.values()))

    def _overrides(self, task: str) -> dict[str, Tensor]:
        """Parameter path → the tensor task ``task`` uses instead (only those that change).

        Cached in eval without autograd. Each part's W + ΔW comes from that part's own cache,
        which checks the factors' values, so here the parts, the frozen weights whose rows fill
        the gaps and the bias tensors (put in the dict as they are, read live) are checked by
        identity and version."""
        parts = {k: p.task_weight(task) for k, p in self.parts.items() if task in p.tasks}
        biases = {k: store.bias_for(task) for k, store in self.biases.items() if task in store.tasks}
        paths = [path for path, segments in self._segments.items() if any(k in parts for k, _ in segments)]
        frozen = [self.base.get_parameter(path) for path in paths]

        def build() -> dict[str, Tensor]:
            out: dict[str, Tensor] = {}
            for path, full in zip(paths, frozen):
                pieces = [parts[k] if k in parts else full if rows is None else full[rows[0]:rows[1]]
                          for k, rows in self._segments[path]]
                out[path] = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 0)
            for k, bias in biases.items():
                out[self._bias_paths[k]] = bias
            return out

        return self._eval_cache.get(task, build, tracked=[*parts.values(), *frozen, *biases.values()],
                                    training=self.training, group=self.context.checks)

    def _task_tensor(self, name: str) -> Tensor | None:
        """A parameter this wrapper adapts (``weight``, ``in_proj_weight`` ...) is read as the
        active task's tensor."""
        context = self.__dict__.get("context")  # not self.context: may run before __init__ set it
        task = context.active if context is not None else None
        if name in self.__dict__.get("_segments", {}) or name in self.__dict__.get("_bias_paths_inv", {}):
            if isinstance(task, str) and self.adapts(task):
                return self._overrides(task).get(name)
        return None

    def merged_module(self, task: str | None) -> nn.Module:
        """A plain copy of ``base`` with the task's W + ΔW (and biases) folded in."""
        merged = copy.deepcopy(self.base)
        if task is not None and self.adapts(task):
            with torch.no_grad():
                for path, tensor in self._overrides(task).items():
                    merged.get_parameter(path).copy_(tensor)
        merged.requires_grad_(True)
        return merged

def _has_parameter(module: nn.Module, path: str) -> bool:
    try:
        return module.get_parameter(path) is not None
    except AttributeError:
        return False


class FTNFusedLinear(_Composite):
    """A fused q/k/v ``nn.Linear`` factorized per projection: the out rows are split into
    ``len(splits)`` equal blocks (q, k, v), each an :class:`FTNProjection` named ``<name>.q`` etc."""

    def __init__(self, base: nn.Linear, context: TaskContext, name: str,
                 selected: Callable[[str], bool] = lambda _: True, train_bias: bool = False,
                 splits: Sequence[str] = ("q", "k", "v")) -> None:
        super().__init__(base, context, name)
        n = len(splits)
        if base.out_features % n:
            raise ConfigError(f"{name!r}: {base.out_features} output features do not split into "
                              f"{n} equal projections; use fused_qkv='plain' or exclude it from qkv_patterns")
        size = base.out_features // n
        for i, key in enumerate(splits):
            self._add_segment("weight", key, (i * size, (i + 1) * size), f"{name}.{key}", selected)
        if train_bias:
            self._add_bias("bias", "bias", f"{name}.bias")

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        task = self.context.active
        if not self.adapts(task):
            return self.base(x)
        overrides = self._overrides(task)
        if type(self.base) is nn.Linear:
            return F.linear(x, overrides.get("weight", self.base.weight), overrides.get("bias", self.base.bias))
        return functional_call(self.base, overrides, (x,))


class FTNMultiheadAttention(_Composite):
    """``nn.MultiheadAttention`` with per-task ΔW on its input and output projections.

    Parts (names as FTNModel reports them, ``<name>`` the MHA's module name):

    - packed input projection (``_qkv_same_embed_dim``), plain: ``<name>.in_proj`` over
      ``in_proj_weight`` (3E × E); per projection: ``<name>.q_proj``, ``k_proj``, ``v_proj``
      over its three row blocks (E × E each);
    - separate q/k/v weights (``kdim``/``vdim`` ≠ E): ``<name>.q_proj`` etc. always;
    - ``<name>.out_proj`` over ``out_proj.weight``.

    ``forward`` is ``functional_call(base, {...: W + ΔW}, args, kwargs)``: PyTorch's own MHA
    code with every argument (masks, ``need_weights``, ``is_causal`` ...) passed through.
    Other attributes (``batch_first``, ``num_heads`` ...) are read from the base module.
    """

    def __init__(self, base: nn.MultiheadAttention, context: TaskContext, name: str,
                 selected: Callable[[str], bool] = lambda _: True, per_projection: bool = False,
                 train_bias: bool = False) -> None:
        super().__init__(base, context, name)
        prefix = f"{name}." if name and name != "<root>" else ""
        e = base.embed_dim
        if base._qkv_same_embed_dim:
            if per_projection:
                for i, key in enumerate(("q_proj", "k_proj", "v_proj")):
                    self._add_segment("in_proj_weight", key, (i * e, (i + 1) * e), prefix + key, selected)
            else:
                self._add_segment("in_proj_weight", "in_proj", None, prefix + "in_proj", selected)
        else:
            for key in ("q_proj", "k_proj", "v_proj"):
                self._add_segment(f"{key}_weight", key, None, prefix + key, selected)
        self._add_segment("out_proj.weight", "out_proj", None, prefix + "out_proj", selected)
        if train_bias and self.parts:
            self._add_bias("in_proj_bias", "in_proj_bias", prefix + "in_proj_bias")
            self._add_bias("out_proj_bias", "out_proj.bias", prefix + "out_proj.bias")

    @property
    def _qkv_same_embed_dim(self) -> bool:
        """Reported False on purpose: ``nn.TransformerEncoderLayer`` checks it before taking its
        fused inference fast path, which reads the frozen weights directly and would bypass ΔW.
        Declining it sends the layer through this wrapper's forward (PyTorch's MHA code)."""
        return False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        task = self.context.active
        if not self.adapts(task):
            return self.base(*args, **kwargs)
        return functional_call(self.base, self._overrides(task), args, kwargs)

    def extra_repr(self) -> str:
        return f"name={self.layer_name!r}, parts={list(self.parts)}, biases={list(self.biases)}"

