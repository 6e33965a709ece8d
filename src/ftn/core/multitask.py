"""All tasks in one pass: run every adapted layer once for T tasks on the same input.

``forward_all_tasks(model, x, tasks)`` returns ``{task: model(x, task=task)}`` without looping
over tasks. Activations carry the T tasks side by side along the channel axis, (N, T·C, ...):

* a conv runs once as a grouped conv over the stacked per-task weights [W+ΔW_1; ...; W+ΔW_T]
  (groups T·g) on accelerators; on CPU, where oneDNN's grouped kernels are slower than T plain
  convs, as T convs over the channel blocks. The first conv sees the shared input (N, C, ...)
  and, when g = 1, needs no repeat at all: one conv with T·C_out output channels;
* a Linear runs as one batched matmul over the T blocks;
* each BatchNorm (eval statistics) / GroupNorm runs once with the tasks' own parameters
  concatenated — per-channel, so exactly each task's own norm;
* everything between them (ReLU, pooling, residual adds, flatten of a (N, T·C, 1, 1) map) acts
  per channel and needs no change.

Stacked weights, biases and norm tensors are built once and reused while their inputs are
unchanged (:mod:`ftn.core.cache`: every task's factors, the biases and the norm parameters and
statistics by value, frozen weights by identity and version), checked once per pass on
accelerators (:func:`ftn.core.cache.eval_pass`).

Limits (checked where possible; :func:`forward_all_tasks` then falls back to the loop):

* norms must be BatchNorm in eval mode (batch statistics would mix nothing, but updating
  per-task running statistics is not supported) or GroupNorm; LayerNorm / other norms are not
  stacked; modules with parameters other than Conv/Linear/norms are not supported;
* conv subclasses with their own ``forward`` (e.g. "same"-padding ports) are not supported;
* ops that mix channels outside Conv/Linear — ``torch.cat`` along channels (DenseNet), channel
  shuffle (ShuffleNet), reshapes over the channel axis (attention heads) — cannot be detected and
  would give wrong results: compare against the loop once for a new architecture
  (``check=True``), as the tests do for ResNet-18 and MobileNetV2.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .cache import CheckGroup, EvalCachedModule, eval_pass
from .layers import FTNLayer
from .norms import TaskNorm

__all__ = ["forward_all_tasks", "MultiTaskBackbone", "UnsupportedForStacking"]

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_Source = tuple[Callable[[], Tensor], list[Tensor], list[Tensor]]  # build, exact, tracked


class UnsupportedForStacking(NotImplementedError):
    """The backbone has a layer that cannot run for all tasks at once."""


class _Stacked(EvalCachedModule):
    """Concatenates per-task tensors once and reuses the result while none of them changed."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.group: CheckGroup | None = None  # the model's (set by MultiTaskBackbone)

    def _cached(self, key: str, build: Callable[[], Tensor], exact: list[Tensor] = (),
                tracked: list[Tensor] = ()) -> Tensor:
        """``build()``, cached in eval without autograd while ``exact`` (compared by value) and
        ``tracked`` (identity and version) are unchanged; see :mod:`ftn.core.cache`."""
        return self._eval_cache.get(key, build, exact=exact, tracked=tracked, group=self.group)

    def _stacked_bias(self, bias: Tensor | None) -> Tensor | None:
        if bias is None:
            return None
        return self._cached("b", lambda: torch.cat([bias] * self.num_tasks), exact=[bias])

    def _stacked_input(self, x: Tensor, channels: int, dim: int) -> bool:
        if x.shape[dim] == self.num_tasks * channels:
            return True
        if x.shape[dim] == channels:
            return False
        raise ValueError(f"expected {channels} or {self.num_tasks}×{channels} channels, got {x.shape[dim]}")


class _StackedConv(_Stacked):
    def __init__(self, base: nn.Module, weight: Callable[[], _Source], num_tasks: int) -> None:
        super().__init__(num_tasks)
        if type(base) not in _CONV_TYPES:
            raise UnsupportedForStacking(f"conv subclass {type(base).__name__} has its own forward")
        self.base_ref = [base]  # a list: not a submodule, so its parameters are not re-registered
        self.weight_source = weight

    def forward(self, x: Tensor) -> Tensor:
        base, t = self.base_ref[0], self.num_tasks
        weight = self._cached("w", *self.weight_source())
        bias = self._stacked_bias(base.bias)
        conv = _CONV_FN[len(base.kernel_size)]
        stacked = self._stacked_input(x, base.in_channels, 1)
        padding = base.padding
        if base.padding_mode != "zeros":
            x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            padding = 0
        args = (base.stride, padding, base.dilation)
        if not stacked and base.groups == 1:
            # Shared input (the stem): one conv with T·C_out output channels, one read of x.
            return conv(x, weight, bias, *args, base.groups)
        if x.device.type == "cpu":
            # On CPU, one grouped conv over T·g groups is slower than T convs (oneDNN's grouped
            # kernels lose up to 60× for depthwise at T·C channels; see docs/performance.md), so
            # run each task's block of channels with its own weight and concatenate.
            xs = x.chunk(t, dim=1) if stacked else [x] * t
            ws, bs = weight.chunk(t, dim=0), (bias.chunk(t) if bias is not None else [None] * t)
            return torch.cat([conv(xi, wi, bi, *args, base.groups) for xi, wi, bi in zip(xs, ws, bs)], 1)
        if not stacked:  # a grouped conv cannot share its input across tasks: repeat it
            x = x.repeat(1, t, *([1] * (x.dim() - 2)))
        return conv(x, weight, bias, *args, base.groups * t)


class _StackedLinear(_Stacked):
    def __init__(self, base: nn.Linear, weight: Callable[[], _Source], num_tasks: int) -> None:
        super().__init__(num_tasks)
        if type(base) is not nn.Linear:
            raise UnsupportedForStacking(f"Linear subclass {type(base).__name__}")
        self.base_ref = [base]
        self.weight_source = weight

    def forward(self, x: Tensor) -> Tensor:
        base, t = self.base_ref[0], self.num_tasks
        weight = self._cached("w", *self.weight_source())  # (T·O, I)
        bias = self._stacked_bias(base.bias)
        if not self._stacked_input(x, base.in_features, -1):
            return F.linear(x, weight, bias)  # shared input: one matmul for all tasks
        lead = x.shape[:-1]
        xs = x.reshape(-1, t, base.in_features).transpose(0, 1)  # (T, M, I)
        y = torch.bmm(xs, weight.view(t, base.out_features, base.in_features).transpose(1, 2))
        y = y.transpose(0, 1).reshape(*lead, t * base.out_features)
        return y if bias is None else y + bias


class _StackedNorm(_Stacked):
    def __init__(self, modules: Callable[[], list[nn.Module]], num_tasks: int) -> None:
        super().__init__(num_tasks)
        self.modules_fn = modules
        first = modules()[0]
        if not isinstance(first, (_BatchNorm, nn.GroupNorm)):
            raise UnsupportedForStacking(f"{type(first).__name__} cannot be stacked over tasks")

    def forward(self, x: Tensor) -> Tensor:
        norms, t = self.modules_fn(), self.num_tasks
        first = norms[0]
        if isinstance(first, _BatchNorm):
            if any(n.training or not n.track_running_stats for n in norms):
                raise UnsupportedForStacking("BatchNorm must be in eval mode with running statistics")
            channels = first.num_features
        else:
            channels = first.num_channels
        if not self._stacked_input(x, channels, 1):
            x = x.repeat(1, t, *([1] * (x.dim() - 2)))

        # One entry for all the norms' tensors, compared by value in one go: BatchNorm updates
        # its running statistics in place without bumping their version counters.
        attrs = ("weight", "bias")
        if isinstance(first, _BatchNorm):
            attrs = ("running_mean", "running_var", *attrs)
        per_task = {a: [getattr(n, a) for n in norms] for a in attrs if getattr(first, a, None) is not None}
        stacked = self._eval_cache.get("norm", lambda: {a: torch.cat(ts) for a, ts in per_task.items()},
                                       exact=[p for ts in per_task.values() for p in ts], group=self.group).get
        if isinstance(first, _BatchNorm):
            return F.batch_norm(x, stacked("running_mean"), stacked("running_var"), stacked("weight"),
                                stacked("bias"), False, 0.0, first.eps)
        return F.group_norm(x, t * first.num_groups, stacked("weight"), stacked("bias"), first.eps)


def _weight_source(module: nn.Module, tasks: Sequence[str]) -> Callable[[], _Source]:
    """What the stacked weight [W + ΔW_1; ...; W + ΔW_T] of ``module`` is built from: (build,
    every task's factors, the frozen weight). Built here rather than from each layer's own cached
    W + ΔW, so the one-pass runner holds one dense copy per layer, not T + 1."""
    if isinstance(module, FTNLayer):
        def source() -> _Source:
            base = module.base.weight
            adapted = [module.tasks[t] if t in module.tasks else None for t in tasks]
            factors = [f for cp in adapted if cp is not None for f in cp.tensors()]
            return (lambda: torch.cat([base if cp is None else base + cp.delta(base.shape) for cp in adapted]),
                    factors, [base])
        return source

    def frozen() -> _Source:  # a frozen layer no task adapts
        weight = module.weight
        return lambda: torch.cat([weight] * len(tasks)), [], [weight]
    return frozen


def _outer_modules(root: nn.Module):
    """Modules of ``root``, not descending into FTN wrappers and task norms (their insides are
    handled by the wrapper's stacked replacement)."""
    stack, seen = [root], set()
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield module
        if not isinstance(module, (FTNLayer, TaskNorm)):
            stack.extend(module.children())


class MultiTaskBackbone(nn.Module):
    """A view of ``model.backbone`` that runs ``tasks`` side by side (see the module docstring).

    It shares every tensor with the model (nothing is copied but the module skeleton), so it
    follows training and loading of the model's tasks.
    """

    def __init__(self, backbone: nn.Module, tasks: Sequence[str]) -> None:
        super().__init__()
        tasks = list(tasks)
        t = len(tasks)
        memo: dict[int, object] = {}
        for module in _outer_modules(backbone):
            if isinstance(module, FTNLayer):
                base = module.base
                stacked = (_StackedLinear(base, _weight_source(module, tasks), t) if isinstance(base, nn.Linear)
                           else _StackedConv(base, _weight_source(module, tasks), t))
                memo[id(module)] = stacked
            elif isinstance(module, TaskNorm):
                memo[id(module)] = _StackedNorm(
                    lambda m=module: [m.task_module(name) for name in tasks], t)
            elif isinstance(module, _CONV_TYPES):
                memo[id(module)] = _StackedConv(module, _weight_source(module, tasks), t)
            elif isinstance(module, nn.Linear):
                memo[id(module)] = _StackedLinear(module, _weight_source(module, tasks), t)
            elif isinstance(module, (_BatchNorm, nn.GroupNorm)):
                memo[id(module)] = _StackedNorm(lambda m=module: [m] * t, t)
            elif any(True for _ in module.parameters(recurse=False)):
                raise UnsupportedForStacking(f"{type(module).__name__} holds parameters of its own")
        # The model's cache group: its layers' W + ΔW and these stacked tensors are checked
        # together, once per pass (on accelerators; see ftn.core.cache.eval_pass).
        self.group = next((m.context.checks for m in backbone.modules() if isinstance(m, FTNLayer)), CheckGroup())
        for stacked in memo.values():
            stacked.group = self.group
        # Share every remaining tensor instead of deep-copying it.
        for tensor in (*backbone.parameters(), *backbone.buffers()):
            memo[id(tensor)] = tensor
        self.tasks = tasks
        self.body = copy.deepcopy(backbone, memo)

    def forward(self, x: Tensor) -> list[Tensor]:
        """One output per task, split from the stacked channel axis (dim 1)."""
        with eval_pass(self.group):
            y = self.body(x)
        return list(y.chunk(len(self.tasks), dim=1))


_RUNNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _runner(model: nn.Module, tasks: tuple[str, ...]) -> MultiTaskBackbone:
    # Keyed on the task tuple and on the model's current modules: a task added or removed after
    # the runner was built changes the FTN layers' task dicts, not these modules, so the
    # weight sources stay correct; only a different task list needs a new runner.
    per_model = _RUNNERS.setdefault(model, {})
    if tasks not in per_model:
        per_model[tasks] = MultiTaskBackbone(model.backbone, tasks)
    return per_model[tasks]


def forward_all_tasks(model, x: Tensor, tasks: Sequence[str] | None = None, *,
                      fallback: bool = True, check: bool = False) -> dict[str, Tensor]:
    """``{task: model(x, task=task)}`` for every task in ``tasks`` (default: all), in one pass.

    ``model`` is an :class:`~ftn.core.model.FTNModel` in eval mode (BatchNorm running statistics).
    With ``fallback`` (default) a backbone this module cannot stack (see the module docstring)
    runs the plain per-task loop instead; ``check=True`` also runs the loop and raises if the
    results differ (use it once when trying a new architecture).
    """
    tasks = tuple(model.tasks if tasks is None else tasks)
    for name in tasks:
        model.check_task(name)
    if not tasks:
        return {}

    def loop() -> dict[str, Tensor]:
        return {name: model(x, task=name) for name in tasks}

    try:
        if model.training:
            raise UnsupportedForStacking("forward_all_tasks needs the model in eval mode")
        features = _runner(model, tasks)(x)
    except UnsupportedForStacking:
        if not fallback:
            raise
        return loop()
    out = {name: model.heads[name](f) for name, f in zip(tasks, features)}
    if check:
        for name, expected in loop().items():
            torch.testing.assert_close(out[name], expected, rtol=1e-4, atol=1e-4)
    return out
