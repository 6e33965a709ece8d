"""`FTNModel`: one frozen backbone, many tasks, each with its own ΔW factors, norms and head.

Model surgery happens once, in ``__init__`` (:func:`ftn.core.injection.inject`): every Conv/Linear layer
selected by the include and exclude patterns is replaced in place by an FTN wrapper (see
:mod:`ftn.core.layers`) and every normalisation layer by a :class:`~ftn.core.norms.TaskNorm`. All wrappers
share one :class:`~ftn.core.layers.TaskContext`, so selecting a task is a single assignment. Tasks are
then added, trained, saved, loaded, merged and removed without touching the frozen weights.

This class is the model: the wrapped backbone, its tasks, which one is active, the forward
passes and each task's parameters. What is done *with* a model lives with its concept and
reads the model through its public methods: adapter files (:mod:`ftn.core.adapters`, which
also keeps each task's spec and info), ranks and budgets (:mod:`ftn.core.allocation`), the
parameter report (:mod:`ftn.core.report`), merging (:mod:`ftn.core.merge`), BatchNorm
recalibration (:mod:`ftn.core.norms`) and output recomputation (:mod:`ftn.core.recompute`);
the methods of those names here only hand over to them.
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from itertools import chain, repeat
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import adapters, allocation, merge, norms, recompute, report
from .cache import EntryWatch, caching_enabled, eval_pass
from .config import FTNConfig, validate_task_name
from .digest import tensor_digest
from .errors import ConfigError, ShapeError, TaskError
from .injection import inject
from .layers import BaseWrapper, FTNConv, FTNLayer, FTNLinear, MixedTasks, TaskContext, build_task_weights
from .norms import TaskNorm

__all__ = ["FTNConfig", "FTNModel", "SingleTaskView"]


class FTNModel(nn.Module):
    """Wrap ``backbone`` (any module mapping inputs to features) for multi-task learning.

    The backbone is modified in place and frozen. Example::

        model = FTNModel(torchvision.models.resnet18(), rank=8)
        model.backbone.fc = nn.Identity()  # or strip the classifier before wrapping
        model.add_task("sketch", head=nn.Linear(512, 345))
        logits = model(images, task="sketch")
    """

    def __init__(self, backbone: nn.Module, rank: int = 8, *, config: FTNConfig | None = None,
                 **options: Any) -> None:
        super().__init__()
        if config is None:
            unknown = set(options) - set(FTNConfig.__dataclass_fields__)
            if unknown:
                raise ConfigError(f"unknown FTNModel option(s): {sorted(unknown)}; "
                                  f"valid: {sorted(FTNConfig.__dataclass_fields__)}")
            config = FTNConfig(rank=rank, **options)
        elif options:
            raise ConfigError("pass either config= or keyword options, not both")
        self.config = config
        self.context = TaskContext()
        backbone.requires_grad_(False)
        self.backbone = inject(backbone, self.context, config)
        self.heads = nn.ModuleDict()
        self.task_records = adapters.TaskRecords()  # each task's spec and info (labels, input preparation)
        if not self.adapted_layers():
            raise ConfigError("no Conv/Linear layer matched the include/exclude patterns: nothing to adapt")

    # ------------------------------------------------------------------ introspection
    def adapted_layers(self) -> dict[str, FTNLayer]:
        """Adapted Conv/Linear layers by name (names as in the original backbone)."""
        index = self._layer_index()
        return dict(zip(index.layer_names, index.layers))

    def task_norm_layers(self) -> dict[str, TaskNorm]:
        index = self._layer_index()
        return dict(zip(index.norm_names, index.norms))

    def _layer_index(self) -> _LayerIndex:
        """The wrappers found by the last walk of the backbone, walked again when its module tree
        has changed since (:class:`_LayerIndex`): every training forward and every task added or
        removed reads them, and a walk of MobileNetV2 costs ~1 ms."""
        index = self.__dict__.get("_layers")
        if index is None or not index.valid(self._modules["backbone"]):
            index = self.__dict__["_layers"] = _LayerIndex(self._modules["backbone"])
        return index

    @property
    def tasks(self) -> list[str]:
        """Task names in the order they were added."""
        return list(self.heads.keys())

    def check_task(self, name: str) -> str:
        """``name`` if the model has that task, else TaskError listing the known tasks."""
        if name not in self.heads:
            known = ", ".join(map(repr, self.tasks)) or "none yet"
            raise TaskError(f"unknown task {name!r}; known tasks: {known}")
        return name

    # ------------------------------------------------------------------ tasks
    def add_task(self, name: str, head: nn.Module | None = None, rank: int | None = None,
                 rank_pattern: Mapping[str, int] | None = None, *, unfreeze: Sequence[str] | None = None,
                 gate: Mapping[str, Any] | None = None, budget: int | float | None = None,
                 scores: Mapping[str, Tensor] | None = None) -> None:
        """Add a task: ΔW factors on every adapted layer (ΔW = 0 at start), its own copy of every
        norm, and ``head`` (default ``nn.Identity``) applied to the backbone's output.

        ``rank`` defaults to the model's; ``rank_pattern`` (glob → rank) overrides it per layer
        for this task, replacing the model-wide pattern. Layers matching ``unfreeze`` (globs,
        default the config's) get a dense update W + D instead (partial unfreezing); with
        ``gate`` (``{"tau": τ, "init_score": s₀}``, both optional) every other layer gets TAPS's
        gated dense update W + 1[s ≥ τ]·δW instead of CP factors (:mod:`ftn.core.updates`).

        ``budget`` instead of a rank: a number of ΔW parameters (int) or a fraction in (0, 1) of
        the backbone's parameters; the per-layer ranks (0 allowed) are then chosen to fit it
        (:mod:`ftn.core.allocation`): from per-component importance ``scores`` (``{layer: tensor}``,
        e.g. an :class:`~ftn.core.allocation.ImportanceTracker` of a warm-up task) by a greedy
        knapsack, or, without scores, uniformly: rank R on every layer and R + 1 on as many as still
        fit (:func:`~ftn.core.allocation.uniform_ranks`).
        """
        if budget is not None:
            if rank is not None or rank_pattern is not None:
                raise ConfigError("give either budget= or rank= / rank_pattern=, not both")
            if unfreeze or gate is not None or self.config.unfreeze:
                raise ConfigError("budget= allocates CP ranks only; it cannot be combined with unfreeze or gate")
            self._check_new_task(name)
            ranks, spec = allocation.budget_ranks(self, budget, scores)
            self.add_task_with_ranks(name, ranks, head, spec=spec)
            return
        self._check_new_task(name)
        if scores is not None:
            raise ConfigError("scores= is only used with budget=")
        rank = self.config.rank if rank is None else rank
        if not isinstance(rank, int) or rank < 0:
            raise ConfigError(f"rank must be an integer >= 0, got {rank!r}")
        unfreeze = list(self.config.unfreeze if unfreeze is None else unfreeze)
        if isinstance(unfreeze, str) or not all(isinstance(p, str) for p in unfreeze):
            raise ConfigError(f"unfreeze must be a list of glob strings, got {unfreeze!r}")
        ranks, updates = allocation.task_ranks(self, rank, rank_pattern, unfreeze, gate)
        spec: dict[str, Any] = {"rank": rank, "rank_pattern": dict(rank_pattern) if rank_pattern is not None else None}
        if unfreeze:
            spec["unfreeze"] = unfreeze
        if gate is not None:
            spec["gate"] = dict(gate)
        self.add_task_with_ranks(name, ranks, head, spec=spec, updates=updates)

    def _check_new_task(self, name: Any) -> None:
        validate_task_name(name)
        if name in self.heads:
            raise TaskError(f"task {name!r} already exists; remove_task({name!r}) first to replace it")

    def add_task_with_ranks(self, name: str, ranks: Mapping[str, tuple[int, int]], head: nn.Module | None = None,
                            *, spec: Mapping[str, Any] | None = None, info: Mapping[str, Any] | None = None,
                            updates: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Add a task whose per-layer ranks are already decided (an adapter file's task):
        ``ranks[layer] = (requested, applied)``; layers not listed are not adapted; ``updates[layer]``
        (``{"kind": "dense"}``, ``{"kind": "gated", "tau": ..}``) makes a listed layer's update
        another kind than CP factors (:func:`ftn.core.updates.make_update`). ``spec`` is
        how the ranks were asked for (``{"rank": .., "rank_pattern": ..}``, see :meth:`task_spec`)
        and ``info`` the task's labels and input preparation (:meth:`set_task_info`). All or
        nothing: on any error the model is left without the task."""
        self._check_new_task(name)
        # Both lists read before the task's modules change the tree (a second read would walk it).
        layers, task_norms = self.adapted_layers(), self.task_norm_layers()
        unknown = sorted(set(ranks) - set(layers))
        if unknown:
            raise ConfigError(f"ranks given for layers this model does not adapt: {unknown[:5]}")
        init = self.config.factor_init
        try:
            for layer_name, layer in layers.items():
                requested, applied = ranks.get(layer_name, (0, 0))
                if applied > 0:
                    layer.add_task(name, applied, init, requested_rank=requested,
                                   update=(updates or {}).get(layer_name))
                elif requested > 0:
                    layer.requested_ranks[name] = requested  # capped to zero: report it
            for norm in task_norms.values():
                norm.add_task(name)
            head = head if head is not None else nn.Identity()
            ref = next(iter(self.backbone.parameters()), None)
            if ref is not None:
                head = head.to(device=ref.device)
            head.requires_grad_(True)
            self.heads[name] = head
            self.task_records.add(name, spec)
            if info is not None:
                self.set_task_info(name, info)
        except Exception:
            self._remove_task_parts(name)
            raise

    def remove_task(self, name: str) -> None:
        self.check_task(name)
        self._remove_task_parts(name)

    def _remove_task_parts(self, name: str) -> None:
        self.__dict__.get("_plain_views", {}).pop(name, None)
        index = self._layer_index()  # read once: removing the task's modules changes the tree
        for layer in index.layers:
            layer.remove_task(name)
        for norm in index.norms:
            norm.remove_task(name)
        if name in self.heads:
            del self.heads[name]
        self.task_records.remove(name)
        if self.context.active == name:
            self.context.active = None

    def set_task(self, name: str | None) -> None:
        """Select the task used by ``forward`` when no ``task=`` is given (None: the frozen backbone)."""
        self.context.active = None if name is None else self.check_task(name)

    @property
    def active_task(self) -> str | None:
        return self.context.active

    @contextmanager
    def using_task(self, name: str | None) -> Iterator[FTNModel]:
        """``with model.using_task("a"): ...`` runs under task ``a`` and restores the previous one."""
        previous = self.context.active
        self.set_task(name)
        try:
            yield self
        finally:
            self.context.active = previous

    # ------------------------------------------------------------------ forward
    def forward(self, *inputs: Any, task: str | None = None, **kwargs: Any) -> Any:
        """Backbone then head, under ``task`` (or the task chosen with ``set_task``).

        With no task at all the frozen, pretrained backbone runs; that is only allowed when no
        task has a head of its own (otherwise which head to apply would be a guess).
        """
        name = task if task is not None else self.context.active
        if name is None:
            custom = [t for t, h in self.heads.items() if not isinstance(h, nn.Identity)]
            if custom:
                raise TaskError(f"no task selected and tasks {custom} have their own heads: "
                                f"pass task=... or call set_task(...)")
            return self.backbone(*inputs, **kwargs)
        self.check_task(name)
        previous = self.context.active
        self.context.active = name
        if not (self.training or torch.is_grad_enabled() or torch.compiler.is_compiling()):
            try:
                out = self._eval_forward(name, inputs, kwargs)
            finally:
                self.context.active = previous
            if out is not _WRAPPERS:
                return out
            self.context.active = name
        recomputer = self.context.recompute
        # Not under torch.compile: the compiled graph decides for itself what to keep.
        recomputing = (recomputer is not None and self.training and torch.is_grad_enabled()
                       and not torch.compiler.is_compiling())
        previous_weights = self.context.weights
        try:
            # eval_pass: one check of the cached weights per pass
            with recomputer.forward() if recomputing else nullcontext(), eval_pass(self.context.checks):
                if torch.is_grad_enabled() and not torch.compiler.is_compiling():
                    # Every layer's W + ΔW in a few ops per shape group, before the layers run
                    # (not compiled: the compiler fuses the per-layer ops itself).
                    self.context.weights = (name, build_task_weights(self._layer_index().layers, name))
                return self.heads[name](self.backbone(*inputs, **kwargs))
        finally:
            self.context.active = previous
            self.context.weights = previous_weights

    def _eval_forward(self, name: str, inputs: tuple, kwargs: dict) -> Any:
        """Eval without autograd: the task's :class:`_PlainBackbone` (plain modules running the
        cached W + ΔW, checked once per pass), then the head; ``_WRAPPERS`` where it does not
        apply (the wrappers' path then runs).

        An input the plain modules refuse makes torch raise one of ``_INPUT_ERRORS`` (a wrong
        shape or dtype); the wrappers then run it, and raise ftn's own error naming the problem.
        If they run it instead, the view was at fault: a warning says so and the task keeps the
        wrappers' path. Any other exception (a bug) propagates as it is."""
        views = self.__dict__.get("_plain_views")
        if views is None:
            views = self.__dict__["_plain_views"] = _Views()
        view = views.get(name)
        if view is None or (view is not _PlainBackbone.UNSUPPORTED and not view.valid()):
            view = views[name] = _PlainBackbone.build(self, name)
        if view is _PlainBackbone.UNSUPPORTED:
            return _WRAPPERS
        try:
            features = view.module(*inputs, **kwargs)
        except _INPUT_ERRORS as error:
            refused = error
        else:
            return self.heads[name](features)
        # Outside the except block: an error of the wrappers is raised on its own, not chained.
        with eval_pass(self.context.checks):
            out = self.heads[name](self.backbone(*inputs, **kwargs))
        views[name] = _PlainBackbone.UNSUPPORTED
        warnings.warn(f"ftn: the eval view of task {name!r} failed where the wrappers did not "
                      f"({type(refused).__name__}: {refused}); this task now runs through the wrappers",
                      RuntimeWarning, stacklevel=3)
        return out

    def backbone_features(self, *inputs: Any, task: str | None = None, **kwargs: Any) -> Any:
        """The backbone's output under ``task`` (no head)."""
        with self.using_task(task if task is not None else self.context.active), eval_pass(self.context.checks):
            return self.backbone(*inputs, **kwargs)

    def recompute_depthwise(self, enabled: bool = True) -> int:
        """Rebuild adapted depthwise convs' outputs in the backward: :func:`ftn.core.recompute.recompute_depthwise`."""
        return recompute.recompute_depthwise(self, enabled)

    def forward_mixed(self, x: Tensor, tasks: Sequence[str], *, grouped: bool = True) -> dict[str, Any]:
        """One pass over a batch whose samples belong to different tasks: sample i runs under
        ``tasks[i]`` (its ΔW, norms and head). In eval without autograd each adapted layer runs
        once for the whole batch, whatever the number of tasks: the frozen W on every row plus
        each row's own low-rank correction, or each row's W + ΔW gathered per row, and each norm
        with each row's own affine (:mod:`ftn.core.mixed`). Otherwise (training, autograd,
        ``grouped=False``, and layers the grouped path does not cover) each layer runs once per
        task present, on that task's samples only; in train mode each task's BatchNorm sees only
        its own samples. Returns ``{task: outputs of its samples}``, in batch order within each
        task."""
        if len(tasks) != x.shape[0]:
            raise ShapeError(f"forward_mixed got {len(tasks)} task names for a batch of {x.shape[0]}")
        for name in dict.fromkeys(tasks):
            self.check_task(name)
        # A walk that stops at wrappers: their children (the frozen base, one update or norm copy
        # per task) hold no wrapper, and walking them made this check grow with the task count.
        found, stack = set(), [self.backbone]
        while stack:
            module = stack.pop()
            if isinstance(module, BaseWrapper):
                if module.mixed_batches is False:
                    found.add(type(module).__name__)
                continue
            stack.extend(child for child in module._modules.values() if child is not None)
        unsupported = sorted(found)
        if unsupported:
            raise ConfigError(f"forward_mixed does not support {unsupported} layers yet; "
                              f"run the tasks separately (forward_tasks)")
        positions: dict[str, list[int]] = {}
        for i, name in enumerate(tasks):
            positions.setdefault(name, []).append(i)
        # Sort the batch by task once, so that every layer works on contiguous slices.
        order = torch.tensor([i for idx in positions.values() for i in idx], dtype=torch.long, device=x.device)
        segments, start = [], 0
        for name, idx in positions.items():
            segments.append((name, start, len(idx)))
            start += len(idx)
        previous = self.context.active
        # Eval without autograd: each layer runs the whole batch once, each row with its own
        # task's correction and norm (ftn.core.mixed); otherwise each task on its own slice.
        self.context.active = MixedTasks(segments, grouped=grouped and not self.training and caching_enabled())
        try:
            with eval_pass(self.context.checks):
                features = self.backbone(x.index_select(0, order))
        finally:
            self.context.active = previous

        def select(value: Any, start: int, length: int) -> Any:
            if isinstance(value, Tensor):
                return value.narrow(0, start, length)
            if isinstance(value, (tuple, list)):
                return type(value)(select(v, start, length) for v in value)
            raise TypeError(f"forward_mixed cannot split a backbone output of type {type(value).__name__}")

        outputs = {}
        for name, start, length in segments:
            with self.using_task(name):  # heads may hold task-specific modules of their own
                outputs[name] = self.heads[name](select(features, start, length))
        return outputs

    def forward_tasks(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Run several tasks in one call: ``{task: x}`` → ``{task: y}``, each with its own ΔW,
        norms and head."""
        for name in inputs:
            self.check_task(name)
        return {name: self(x, task=name) for name, x in inputs.items()}

    def for_task(self, name: str) -> SingleTaskView:
        """This model fixed to task ``name``, as a module whose parameters and buffers are that
        task's only (factors, norm copies, head): what to hand to ``DistributedDataParallel``,
        ``torch.compile`` or an optimizer in your own training loop. See :class:`SingleTaskView`."""
        return SingleTaskView(self, self.check_task(name))

    # ------------------------------------------------------------------ parameters
    def task_parameters(self, name: str) -> list[nn.Parameter]:
        """Exactly the parameters an optimizer should see for ``name``: its weight updates (CP
        factors, dense or gated dense ΔW with their scores), its norm copies and its head."""
        self.check_task(name)
        return [p for _, p in self.named_task_parameters(name)]

    def named_task_parameters(self, name: str) -> list[tuple[str, nn.Parameter]]:
        self.check_task(name)
        params: list[tuple[str, nn.Parameter]] = []
        for layer_name, layer in self.adapted_layers().items():
            if name in layer.tasks:
                params += [(f"delta.{layer_name}.{k}", p) for k, p in layer.tasks[name].parameters_by_key().items()]
        for layer_name, norm in self.task_norm_layers().items():
            params += [(f"norm.{layer_name}.{k}", p) for k, p in norm.tasks[name].named_parameters()]
        params += [(f"head.{k}", p) for k, p in self.heads[name].named_parameters()]
        return params

    def frozen_tensors(self) -> dict[str, Tensor]:
        """The shared backbone's parameters and buffers (everything that is not per task)."""
        # named_parameters() + named_buffers() of the backbone without descending into the
        # wrappers' per-task containers: a walk of those grows with the tasks held (a server
        # with 64 resident MobileNetV2 tasks walked ~10,000 modules per adapter load to
        # fingerprint a backbone of 150). Same order and de-duplication as torch's own walks.
        params: dict[str, Tensor] = {}
        buffers: dict[str, Tensor] = {}
        seen_modules: set[int] = set()
        seen_tensors: tuple[set[int], set[int]] = (set(), set())

        def visit(module: nn.Module, prefix: str) -> None:
            if id(module) in seen_modules:
                return
            seen_modules.add(id(module))
            for out, seen, members in ((params, seen_tensors[0], module._parameters),
                                       (buffers, seen_tensors[1], module._buffers)):
                for key, t in members.items():
                    if t is not None and id(t) not in seen:
                        seen.add(id(t))
                        out[prefix + key] = t
            per_task = module._modules.get("tasks") if isinstance(module, (FTNLayer, TaskNorm)) else None
            for key, child in module._modules.items():
                if child is not None and child is not per_task:
                    visit(child, f"{prefix}{key}.")

        visit(self.backbone, "")
        return {**params, **buffers}

    def backbone_fingerprint(self) -> str:
        """SHA-256 over the names, shapes, dtypes and values of the frozen backbone tensors."""
        return tensor_digest(self.frozen_tensors())

    # ------------------------------------------------------------------ handed over
    def parameter_report(self) -> report.ParameterReport:
        """Parameter accounting: :func:`ftn.core.report.parameter_report`."""
        return report.parameter_report(self)

    def merge(self, name: str) -> nn.Module:
        """Task ``name`` as a standalone plain-PyTorch model: :func:`ftn.core.merge.merge_task`."""
        return merge.merge_task(self, name)

    def recalibrate_norms(self, name: str, loader: Any, max_batches: int | None = None,
                          input_fn: Any = None) -> int:
        """Recompute the task's BatchNorm statistics over ``loader``: :func:`ftn.core.norms.recalibrate_norms`."""
        return norms.recalibrate_norms(self, name, loader, max_batches, input_fn)

    def save_task(self, name: str, path: str | Path, info: Mapping[str, Any] | None = None) -> Path:
        """Write the task's adapter file: :func:`ftn.core.adapters.save_task`."""
        return adapters.save_task(self, name, path, info=info)

    def load_task(self, path: str | Path, name: str | None = None, head: nn.Module | None = None,
                  check_fingerprint: bool = True) -> str:
        """Add a task from an adapter file: :func:`ftn.core.adapters.load_task`."""
        return adapters.load_task(self, path, name=name, head=head, check_fingerprint=check_fingerprint)

    def task_info(self, name: str) -> dict[str, Any]:
        """What the task's outputs mean and how its inputs are prepared (empty if never given)."""
        return self.task_records.info(self.check_task(name))

    def set_task_info(self, name: str, info: Mapping[str, Any] | None) -> dict[str, Any]:
        """Record the task's info, checked by :func:`ftn.core.adapters.validate_task_info`."""
        return self.task_records.set_info(self.check_task(name), info, self.heads[name])

    def task_spec(self, name: str) -> dict[str, Any]:
        """How the task's ranks were asked for: ``{"rank": R, "rank_pattern": {...} | None}``, plus
        ``unfreeze`` / ``gate`` where :meth:`add_task` got them, and ``budget`` (ΔW parameters),
        ``budget_request`` (as given) and ``allocation`` (``auto`` | ``uniform``) for a task added
        with a budget (empty for tasks added with explicit per-layer ranks and no spec)."""
        return self.task_records.spec(self.check_task(name))


class SingleTaskView(nn.Module):
    """One task of an :class:`FTNModel`: ``forward(*inputs)`` is ``model(*inputs, task=name)``.

    It registers only the task's own modules (its weight updates, norm copies and head; the very
    same objects, nothing is copied), so ``parameters()`` and ``buffers()`` are exactly what one
    task trains and what a data-parallel wrapper must synchronise::

        ddp = DistributedDataParallel(model.for_task("sketch"))  # find_unused_parameters=False
        loss = criterion(ddp(x), y); loss.backward(); optimizer.step()

    Wrapping the whole ``FTNModel`` in DDP instead would register every task's parameters, and
    the tasks not run in a step would make DDP wait for gradients that never come. The frozen
    backbone is left out too: every process must build it from the same weights (compare
    ``backbone_fingerprint()`` across ranks if in doubt). Its ``state_dict()`` holds the
    task's tensors only; save tasks with ``FTNModel.save_task``.
    """

    def __init__(self, model: FTNModel, name: str) -> None:
        super().__init__()
        self.__dict__["model"] = model  # not a submodule: the shared backbone is not this module's
        self.task = name
        self.parts = nn.ModuleDict()
        for layer_name, layer in model.adapted_layers().items():
            if name in layer.tasks:
                self.parts[f"delta:{layer_name}".replace(".", ":")] = layer.tasks[name]
        for layer_name, norm in model.task_norm_layers().items():
            self.parts[f"norm:{layer_name}".replace(".", ":")] = norm.tasks[name]
        self.head = model.heads[name]

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        return self.model(*inputs, task=self.task, **kwargs)

    def train(self, mode: bool = True) -> SingleTaskView:
        super().train(mode)
        self.model.train(mode)  # the wrappers' own state (eval caches, frozen norms) follows
        return self


_WRAPPERS: Any = object()  # FTNModel._eval_forward: the view does not apply, run the wrappers
# What torch raises for an input of the wrong shape, dtype or kind (conv / linear / norm checks,
# "Dimension out of range"): the eval view hands those to the wrappers, which name the problem.
_INPUT_ERRORS = (RuntimeError, TypeError, ValueError, IndexError)


class _Views(dict):
    """Each task's :class:`_PlainBackbone`; copies (``copy.deepcopy``, pickling) start empty:
    a view belongs to the modules it was built from."""

    def __deepcopy__(self, memo: dict[int, Any]) -> _Views:
        return type(self)()

    def __reduce__(self) -> tuple:
        return type(self), ()


class _LayerIndex:
    """The FTN wrappers of a backbone as one walk found them, with what proves that a new walk
    would find the same: every module the walk reached still has the same children (the same
    objects, in the same order, the same number) and the same class, and every wrapper the same
    name. That covers every way to change the tree (``setattr``, ``del``, ``Sequential.insert``,
    a write to ``_modules``, ``add_task`` / ``remove_task``, injection) and costs a few loops
    in C over flat lists, ~6x less than the walk. Copies (``copy.deepcopy``, pickling) start
    empty and walk again."""

    __slots__ = ("root", "modules", "types", "dicts", "counts", "children", "layers", "layer_names", "norms",
                 "norm_names")

    def __init__(self, root: nn.Module | None) -> None:
        self.root = root
        self.modules = list(root.modules()) if root is not None else []
        self.types = list(map(type, self.modules))
        self.dicts = list(map(_CHILDREN, self.modules))
        self.counts = list(map(len, self.dicts))
        self.children = list(chain.from_iterable(map(dict.values, self.dicts)))
        self.layers = [m for m in self.modules if isinstance(m, FTNLayer)]
        self.norms = [m for m in self.modules if isinstance(m, TaskNorm)]
        self.layer_names = list(map(_NAME, self.layers))
        self.norm_names = list(map(_NAME, self.norms))

    def valid(self, root: nn.Module) -> bool:
        if root is not self.root or root is None:
            return False
        dicts = list(map(_CHILDREN, self.modules))
        return (all(map(operator.is_, dicts, self.dicts)) and list(map(len, dicts)) == self.counts
                and all(map(operator.is_, chain.from_iterable(map(dict.values, dicts)), self.children))
                and list(map(type, self.modules)) == self.types
                and list(map(_NAME, self.layers)) == self.layer_names
                and list(map(_NAME, self.norms)) == self.norm_names)

    def __deepcopy__(self, memo: dict[int, Any]) -> _LayerIndex:
        return type(self)(None)

    def __reduce__(self) -> tuple:
        return type(self), (None,)


_NAME = operator.attrgetter("layer_name")
_STATE = operator.attrgetter("__dict__")
_CHILDREN = operator.attrgetter("_modules")
_PARAMETERS = operator.attrgetter("_parameters")
_TENSORS = operator.methodcaller("tensors")
_HOOKS = operator.attrgetter("_forward_hooks", "_forward_pre_hooks")
# nn.Module's own attributes: dicts and sets (hooks, parameters, buffers) that a shallow copy
# shares with its original, so that a change inside them reaches the copy; of them only
# ``training`` is a value the copy holds itself, and ``_modules`` is the copy's own (checked apart).
_SHARED = frozenset(nn.Module().__dict__) - {"training"}


class _WithWeight(nn.Module):
    """An adapted Conv / Linear in the eval view: its base module run with the task's cached
    W + ΔW, read from the layer's eval-cache entry through a weak reference (the view keeps no
    dense weight alive once the cache drops it: a server bounding its cache frees it). Everything
    else (bias, stride, padding, groups) is read from the base at each call, as the wrapper does,
    so no change to the base needs a check of its own. Plain attributes, not a submodule and a
    parameter: nothing walks the view. Code that reads the layer's attributes directly (Hugging
    Face ViT reads ``projection.weight.dtype``) gets W + ΔW for ``weight`` and the base's own
    for the rest, as from the wrapper."""

    def __init__(self, base: nn.Module, entry: Any) -> None:
        super().__init__()
        self.__dict__["base"] = base
        self.__dict__["entry"] = entry

    @property
    def weight(self) -> Tensor:
        return self.entry().value

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or "base" not in self.__dict__:
                raise
        return getattr(self.__dict__["base"], name)


class _ConvWithWeight(_WithWeight):
    def forward(self, x: Tensor) -> Tensor:
        base = self.base
        return base._conv_forward(x, self.entry().value, base.bias)


class _LinearWithWeight(_WithWeight):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.entry().value, self.base.bias)


class _PlainBackbone:
    """One task's backbone as plain modules, for eval without autograd at framework speed.

    Each adapted layer becomes its base module run with the task's cached W + ΔW (the layer's
    own eval-cache entry, :meth:`FTNLayer.task_weight`; :class:`_WithWeight`), each task norm is
    the task's own norm module (live: its statistics and affine are read as they are), and each
    container that holds either is a shallow copy with those children. The forward then runs the
    plain backbone's modules: none of the wrappers' per-layer Python.

    Never stale: :meth:`valid` runs before every forward and compares what each layer's eval
    cache would compare at its own lookup (:class:`~ftn.core.cache.EntryWatch`: every input by
    identity and value, the frozen W by identity, address, version and layout, the
    optimizer-step generation, each cache still holding the same entry: ``train()``, ``.to()``
    and ``remove_task`` drop entries), that each task norm runs the same module, that no wrapper
    has gained a hook, that every module it replaced or copied still has the same children, and
    that each copied container's own attributes (its mode, ``use_res_connect``, ...) are as they
    were copied. Any difference rebuilds the view. The checks are loops in C over flat lists
    prepared at build: their cost is what one pass must read, not Python per layer.
    """

    UNSUPPORTED: Any = None  # set below: a view that never applies (a wrapper it cannot flatten)

    def __init__(self) -> None:
        self.module: nn.Module | None = None
        self.task = ""
        self.watch = EntryWatch(self._exact, self._tracked)
        self.updates: list[dict] = []  # per adapted layer: its updates by task, and the task's
        self.update_modules: list[nn.Module] = []
        self.bases: list[nn.Module] = []  # per adapted layer: its base (W is tracked)
        self.wrappers: list[nn.Module] = []  # every wrapper flattened: none may gain a hook
        self.norms: list[dict] = []  # per task norm: its copies by task, and the module run (None: base)
        self.norm_modules: list[nn.Module | None] = []
        self.replaced: list[nn.Module] = []  # every module replaced or copied, and its children
        self.children: list[nn.Module] = []
        self.counts: list[int] = []
        # Each copied container, the size of its __dict__, and its own attributes as copied (a
        # getter of them and their values): what the copy holds by value rather than shares.
        self.copied: list[nn.Module] = []
        self.sizes: list[int] = []
        self.getters: list[operator.attrgetter] = []
        self.values: list[Any] = []

    @classmethod
    def build(cls, model: FTNModel, task: str) -> _PlainBackbone:
        view = cls()
        view.task = task
        module = view._convert(model.backbone)
        if module is None:
            return cls.UNSUPPORTED
        view.module = module
        for original in view.replaced:
            view.children += original._modules.values()
            view.counts.append(len(original._modules))
        return view

    def _convert(self, module: nn.Module) -> nn.Module | None:
        task = self.task
        if isinstance(module, FTNLayer):
            # The built-in wrappers of plain Conv / Linear modules only: a subclass may compute
            # more than base-with-W + ΔW (a task bias), which the base with W + ΔW would not.
            if (type(module) not in (FTNConv, FTNLinear) or not module._plain or module._forward_hooks
                    or module._forward_pre_hooks):
                return None
            self.replaced.append(module)
            self.wrappers.append(module)
            base = module._modules["base"]
            if task not in module._modules["tasks"]._modules:
                return base
            module.task_weight(task)  # fills the eval cache
            updates = module._modules["tasks"]._modules
            update = updates[task]
            # Off the CPU the entries are compared in one batch per pass instead (a sync each).
            entry = self.watch.add(module._eval_cache, task, update.tensors(), [base._parameters["weight"]])
            if entry is None:
                return None
            self.updates.append(updates)
            self.update_modules.append(update)
            self.bases.append(base)
            return (_ConvWithWeight if isinstance(module, FTNConv) else _LinearWithWeight)(base, entry)
        if isinstance(module, TaskNorm):
            if module._forward_hooks or module._forward_pre_hooks:
                return None
            self.replaced.append(module)
            self.wrappers.append(module)
            copies = module._modules["tasks"]._modules
            self.norms.append(copies)
            self.norm_modules.append(copies.get(task))
            return module.task_module(task)
        if isinstance(module, BaseWrapper):  # another wrapper (attention): not flattened
            return None
        if any(isinstance(m, BaseWrapper) for m in module.modules()):
            children = {}
            for name, child in module._modules.items():
                converted = self._convert(child) if child is not None else None
                if child is not None and converted is None:
                    return None
                children[name] = converted
            plain = copy.copy(module)
            plain.__dict__["_modules"] = children
            self.replaced.append(module)
            getter = operator.attrgetter(*[k for k in module.__dict__ if k not in _SHARED])
            self.copied.append(module)
            self.sizes.append(len(module.__dict__))
            self.getters.append(getter)
            self.values.append(getter(module))
            return plain
        return module  # nothing adapted inside: the module itself

    def _exact(self) -> list[Tensor]:
        """The task's factors in every adapted layer, as they are now (for :attr:`watch`)."""
        return list(chain.from_iterable(map(_TENSORS, self.update_modules)))

    def _tracked(self) -> list[Tensor | None]:
        """Every adapted layer's frozen W, as it is now (for :attr:`watch`)."""
        return list(map(dict.get, map(_PARAMETERS, self.bases), repeat("weight")))

    def valid(self) -> bool:
        task = self.task
        # The structure first: the updates read next must be the task's current ones.
        if list(map(len, map(_CHILDREN, self.replaced))) != self.counts:
            return False
        if not all(map(operator.is_, chain.from_iterable(map(dict.values, map(_CHILDREN, self.replaced))),
                       self.children)):
            return False
        if not all(map(operator.is_, map(dict.get, self.updates, repeat(task)), self.update_modules)):
            return False
        if not all(map(operator.is_, map(dict.get, self.norms, repeat(task)), self.norm_modules)):
            return False
        if any(chain.from_iterable(map(_HOOKS, self.wrappers))):
            return False
        if list(map(len, map(_STATE, self.copied))) != self.sizes:
            return False
        try:  # a copied container's own attributes (list equality: identical values short-cut)
            if list(map(operator.call, self.getters, self.copied)) != self.values:
                return False
        except (AttributeError, RuntimeError, ValueError, TypeError):  # one deleted, or now a tensor / array
            return False
        return self.watch.ok()


_PlainBackbone.UNSUPPORTED = _PlainBackbone()
