"""Per-layer rank allocation under a parameter budget.

A task's ΔW at layer l is a sum of rank-1 CP components; keeping component r costs
``Σ_k d_k`` parameters (the layer's mode sizes). Given a *budget* of ΔW parameters, this module
decides how many components each layer keeps (0 allowed: the layer is not adapted):

- :func:`allocate`: the one path from a budget to per-layer ranks — the budget read once
  (:func:`budget_count`: an int is a count, a float in (0, 1) a fraction of the backbone), then
  the uniform allocation when no importance scores are given, else the knapsack on them. The
  functions below are views of it.
- :func:`uniform_ranks` / :func:`uniform_split`: the baseline — the largest rank R that every
  layer can take (:func:`uniform_rank_for_budget`), then R + 1 on as many layers as still fit
  (largest per-rank cost first), so that it spends the budget as fully as the automatic
  allocation does and the two are compared at the same ΔW.
- :class:`ImportanceTracker`: per-component importance learned while a task trains at a larger
  ("warm") rank. For a multilinear rank-1 term the first-order Taylor estimate of the loss change
  when component r is removed is ``⟨∂L/∂W, a_r⊗b_r⊗c_r⟩ = a_rᵀ·∂L/∂a_r`` (= ``b_rᵀ·∂L/∂b_r`` = …),
  so it comes from the factor gradients alone (which the fast backward already computes, never
  the dense weight gradient). The tracker keeps an exponential moving average of its absolute
  value (AdaLoRA's smoothed sensitivity, optionally times its uncertainty).
- :func:`magnitude_scores`: the alternative signal, ‖a_r‖·‖b_r‖·‖c_r‖ / ‖W_l‖.
- :func:`select_components` / :func:`allocate_ranks`: a greedy knapsack: components sorted by
  importance per parameter, kept while they fit the budget and the layer's rank cap.

The ranks of a task added with a rank rather than a budget are decided here too
(:func:`layer_rank`, :func:`capped_rank`, :func:`task_ranks`).

Everything here works on an :class:`~ftn.core.model.FTNModel` through its public methods
(``adapted_layers``, ``frozen_tensors``, ``config``) and does not import it.
``docs/allocation.md`` has an example with a hand-written training loop.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .config import FTNConfig
from .cp import cp_num_params, max_efficient_rank
from .errors import ConfigError
from .report import backbone_parameters

__all__ = [
    "layer_rank",
    "capped_rank",
    "task_ranks",
    "budget_ranks",
    "backbone_parameters",
    "check_budget",
    "budget_count",
    "resolve_budget",
    "Allocation",
    "allocate",
    "layer_capacities",
    "delta_parameters",
    "uniform_rank_for_budget",
    "uniform_split",
    "uniform_ranks",
    "ImportanceTracker",
    "magnitude_scores",
    "select_components",
    "allocate_ranks",
]


def layer_rank(config: FTNConfig, layer_name: str, task_rank: int,
               rank_pattern: Mapping[str, int] | None = None) -> int:
    """Rank requested for a layer: the first matching pattern of ``rank_pattern`` (default the
    config's), else the task's rank."""
    for pattern, value in (rank_pattern if rank_pattern is not None else config.rank_pattern).items():
        if fnmatch.fnmatchcase(layer_name, pattern):
            return value
    return task_rank


def capped_rank(config: FTNConfig, layer: Any, requested: int) -> int:
    """The rank a layer applies: ``requested``, lowered to ``max_efficient_rank`` of its modes
    when the config's ``rank_cap`` is on (beyond it the factors outgrow a dense ΔW)."""
    if config.rank_cap:
        return min(requested, max_efficient_rank(layer.modes))
    return requested


def task_ranks(model: Any, rank: int, rank_pattern: Mapping[str, int] | None, unfreeze: Sequence[str],
               gate: Mapping[str, Any] | None) -> tuple[dict[str, tuple[int, int]], dict[str, dict[str, Any]]]:
    """Per adapted layer, ``(requested, applied)`` rank and, where the update is not CP factors,
    its kind (``{"kind": "dense"}`` for layers matching ``unfreeze``, else ``{"kind": "gated", **gate}``
    with a ``gate``): what ``FTNModel.add_task_with_ranks`` takes for a task added with a rank."""
    ranks, updates = {}, {}
    for layer_name, layer in model.adapted_layers().items():
        if any(fnmatch.fnmatchcase(layer_name, p) for p in unfreeze):
            updates[layer_name] = {"kind": "dense"}
        elif gate is not None:
            updates[layer_name] = {"kind": "gated", **gate}
        else:
            requested = layer_rank(model.config, layer_name, rank, rank_pattern)
            ranks[layer_name] = (requested, capped_rank(model.config, layer, requested))
            continue
        ranks[layer_name] = (1, 1)  # dense kinds: the layer sets its own (full) rank
    return ranks, updates


def layer_capacities(model: Any) -> dict[str, int]:
    """The most components each adapted layer may keep: its rank cap (``max_efficient_rank``,
    unless the model's ``rank_cap`` is off), 0 where the model's ``rank_pattern`` says 0."""
    caps = {}
    for name, layer in model.adapted_layers().items():
        if layer_rank(model.config, name, 1) == 0:
            caps[name] = 0
        else:
            caps[name] = max_efficient_rank(layer.modes) if model.config.rank_cap else 1 << 30
    return caps


def _costs(model: Any) -> dict[str, int]:
    """What keeping one rank-1 component costs per layer: Σ_k d_k."""
    return {name: cp_num_params(layer.modes, 1) for name, layer in model.adapted_layers().items()}


def delta_parameters(model: Any, ranks: Mapping[str, int]) -> int:
    """ΔW parameters of per-layer ``ranks`` (layers not listed: 0)."""
    costs = _costs(model)
    return sum(costs[name] * int(r) for name, r in ranks.items())


def check_budget(budget: Any) -> None:
    """ConfigError unless ``budget`` has a budget's form: a positive whole number of ΔW
    parameters, or a fraction in (0, 1)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise ConfigError(f"budget must be a number of ΔW parameters or a fraction in (0, 1), got {budget!r}")
    if budget <= 0:
        raise ConfigError(f"budget must be positive (a number of ΔW parameters or a fraction in (0, 1)), "
                          f"got {budget!r}")
    if isinstance(budget, float) and budget >= 1 and not budget.is_integer():
        raise ConfigError(f"budget must be a fraction in (0, 1) or a whole number of parameters, got {budget!r}")


def budget_count(budget: int | float, total: int) -> int:
    """The one reading of a budget: an int (or a whole float) is a number of ΔW parameters, a
    float in (0, 1) that fraction of ``total`` (the backbone's parameters)."""
    check_budget(budget)
    return int(budget * total) if isinstance(budget, float) and budget < 1 else int(budget)


def resolve_budget(model: Any, budget: int | float) -> int:
    """A budget as a number of ΔW parameters for ``model`` (:func:`budget_count` of its
    backbone). ConfigError for a budget that is not positive, larger than the backbone, or
    smaller than the cheapest single component."""
    total = backbone_parameters(model)
    count = budget_count(budget, total)
    if count > total:
        raise ConfigError(f"budget {budget!r} = {count:,} ΔW parameters exceeds the backbone's {total:,} "
                          f"parameters; give a fraction in (0, 1) or a smaller count")
    caps = layer_capacities(model)
    costs = {name: c for name, c in _costs(model).items() if caps[name] > 0}
    if not costs:
        raise ConfigError("no adapted layer may take a component (every rank cap or rank_pattern is 0)")
    cheapest = min(costs.values())
    if count < cheapest:
        raise ConfigError(f"budget {budget!r} = {count:,} ΔW parameters is smaller than the cheapest single "
                          f"rank-1 component ({cheapest:,} parameters, layer "
                          f"{min(costs, key=costs.get)!r}); raise the budget")
    return count


def _base_rank(count: int, caps: Mapping[str, int], costs: Mapping[str, int]) -> int:
    """The largest R >= 0 such that every layer at min(R, its cap) fits ``count``."""

    def size(rank: int) -> int:
        return sum(costs[n] * min(rank, caps[n]) for n in costs)

    lo, hi = 0, min(max(caps.values(), default=0), count)  # size(lo) <= count
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if size(mid) <= count:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class Allocation:
    """Per-layer ranks for a budget, and how they were chosen."""

    count: int  # the budget in ΔW parameters
    kind: str  # "uniform" | "auto"
    ranks: dict[str, int]  # every adapted layer, 0 allowed
    base_rank: int = 0  # uniform: the rank every layer gets (capped); 0 below one component per layer
    plus_one: tuple[str, ...] = ()  # uniform: the layers given base_rank + 1, in the order given
    kept: dict[str, list[int]] | None = None  # auto: the scored components kept per layer, best first


def allocate(model: Any, budget: int | float, scores: Mapping[str, Tensor] | None = None) -> Allocation:
    """The ranks of a task for ``budget`` (read once, :func:`resolve_budget`): without
    ``scores`` the uniform allocation (:func:`uniform_split`), with per-component importance
    ``scores`` (``{layer: tensor}``) the greedy knapsack on them (:func:`select_components`)."""
    count = resolve_budget(model, budget)
    caps, costs = layer_capacities(model), _costs(model)
    if scores is None:
        base, ranks, plus_one = _uniform(count, caps, costs)
        return Allocation(count, "uniform", ranks, base, tuple(plus_one))
    kept = _knapsack(count, caps, costs, scores)
    return Allocation(count, "auto", {n: len(k) for n, k in kept.items()}, kept=kept)


def budget_ranks(model: Any, budget: int | float, scores: Mapping[str, Tensor] | None = None,
                 ) -> tuple[dict[str, tuple[int, int]], dict[str, Any]]:
    """For ``FTNModel.add_task(budget=...)``: the :func:`allocate` ranks as ``(requested, applied)``
    per layer, and the task's spec (``budget``, ``budget_request``, ``allocation``; ``rank`` is the
    uniform allocation's base rank, at least 1, and None for the automatic one)."""
    chosen = allocate(model, budget, scores)
    spec = {"rank": max(chosen.base_rank, 1) if chosen.kind == "uniform" else None, "rank_pattern": None,
            "budget": chosen.count, "budget_request": budget, "allocation": chosen.kind}
    return {n: (r, r) for n, r in chosen.ranks.items()}, spec


def uniform_rank_for_budget(model: Any, budget: int | float) -> int:
    """The base rank R of the uniform allocation: the largest rank such that every layer at
    min(R, its cap) fits the budget, but at least 1. :func:`uniform_ranks` gives every layer R
    and some layers R + 1 (:func:`uniform_split`); ``ftn train`` records R and bases the probe's
    warm rank on it. Below one component on every layer (R would be 0) it is 1, and
    :func:`uniform_ranks` gives rank 1 to some layers and 0 to the others."""
    return max(allocate(model, budget).base_rank, 1)


def uniform_split(model: Any, budget: int | float) -> tuple[int, dict[str, int], list[str]]:
    """The uniform allocation in full: ``(base, ranks, plus_one)`` — the base rank (0 when one
    component on every layer exceeds the budget, else :func:`uniform_rank_for_budget`), the
    per-layer ranks, and the layers given ``base + 1``, in the order they were given it.

    Every layer gets ``min(base, cap)``. What is left of the budget then goes, one extra
    component per layer, to the layers whose cap allows ``base + 1``, **largest per-rank cost
    first** (ties: model order), each taken while it fits, the others skipped. So ranks differ
    by at most 1 across layers (apart from layers capped below ``base``), the ΔW never exceeds
    the budget, and the result is deterministic.

    Why this order: the point of the remainder is that ``uniform`` spends the same ΔW as
    ``auto`` (whose greedy knapsack fills its budget to within a few small components), so that
    comparing them compares where the ranks go, not how many parameters each got. Taking the
    expensive layers while much of the remainder is left and trying the cheap ones last lets
    the cheap ones fill the gap: what stays unspent is less than the cost of the cheapest layer
    that was skipped (in practice under 0.2 % of the budget on MobileNetV2 and ResNet-18, as
    close as ``auto``). Cheapest-first would give the extra rank to more layers but stops at the
    first layer that does not fit, leaving up to one large layer's cost unspent (about 2 % on
    MobileNetV2 at a 2.2 % budget); model order is in between. The price: the extra components
    sit on the wide layers, and below one component per layer (``base`` = 0) the layers adapted
    at rank 1 are the most expensive ones that fit rather than the most numerous."""
    a = allocate(model, budget)
    return a.base_rank, a.ranks, list(a.plus_one)


def _uniform(count: int, caps: Mapping[str, int], costs: Mapping[str, int]) -> tuple[int, dict[str, int], list[str]]:
    base = _base_rank(count, caps, costs)
    ranks = {n: min(base, caps[n]) for n in costs}
    left = count - sum(costs[n] * r for n, r in ranks.items())
    order = {n: i for i, n in enumerate(costs)}
    plus_one = []
    for name in sorted((n for n in costs if caps[n] > base), key=lambda n: (-costs[n], order[n])):
        if costs[name] <= left:
            ranks[name] += 1
            left -= costs[name]
            plus_one.append(name)
    return base, ranks, plus_one


def uniform_ranks(model: Any, budget: int | float) -> dict[str, int]:
    """Per-layer ranks of the uniform baseline (every adapted layer listed): R or R + 1 on every
    layer (capped), as much of the budget spent as that allows; see :func:`uniform_split`."""
    return allocate(model, budget).ranks


# ----------------------------------------------------------------------------- importance
class ImportanceTracker:
    """Per-component importance of task ``task``'s ΔW, from the factor gradients of each step.

    For component r of a layer, the first-order estimate of the loss change when it is removed
    is ``s_r = a_rᵀ·∂L/∂a_r`` (the same for every mode). The tracker keeps, per component,
    ``Ī ← β·Ī + (1-β)·|s_r|`` and, with ``uncertainty=True``, AdaLoRA's
    ``Ū ← β_u·Ū + (1-β_u)·| |s_r| - Ī |``; :meth:`scores` returns Ī (or Ī·Ū), bias-corrected.
    A step where every s_r of a layer is 0 is not counted: with the default initialisation (one
    mode exactly zero, so ΔW = 0) that is the first step, which says nothing yet.

    Two ways to feed it::

        tracker = ImportanceTracker(model, "task")
        loss.backward(); tracker.step(); optimizer.step(); optimizer.zero_grad()

    or ``tracker.attach()`` once: hooks then update it after every backward (what the training
    engine uses; call :meth:`detach` when done). With gradient accumulation use :meth:`step` once
    per optimizer step instead. Gradients scaled by an fp16 ``GradScaler`` scale every layer
    alike within a step, so the ranking within a step is unaffected.
    """

    def __init__(self, model: Any, task: str, beta: float = 0.85, uncertainty: bool = False,
                 beta_uncertainty: float = 0.85) -> None:
        if not 0.0 <= beta < 1.0 or not 0.0 <= beta_uncertainty < 1.0:
            raise ConfigError("beta and beta_uncertainty must be in [0, 1)")
        self.task = task
        self.beta, self.beta_u, self.uncertainty = beta, beta_uncertainty, uncertainty
        self.layers = {n: layer for n, layer in model.adapted_layers().items() if task in layer.tasks}
        self.mean: dict[str, Tensor] = {}
        self.spread: dict[str, Tensor] = {}
        self.steps: dict[str, int] = dict.fromkeys(self.layers, 0)
        self._handles: list[Any] = []

    def _factor(self, name: str) -> nn.Parameter:
        factors = list(self.layers[name].tasks[self.task].factors)
        return min(factors, key=lambda f: f.shape[0])  # any mode gives s_r; the smallest is cheapest

    @torch.no_grad()
    def _update(self, name: str, factor: Tensor) -> None:
        if factor.grad is None:
            return
        s = (factor.detach().float() * factor.grad.detach().float()).sum(0).abs()
        if not bool(s.any()):  # e.g. the first step, where the zero-initialised mode makes every s_r 0
            return
        if name not in self.mean:
            self.mean[name] = torch.zeros_like(s)
            self.spread[name] = torch.zeros_like(s)
        mean = self.mean[name]
        mean.mul_(self.beta).add_(s, alpha=1 - self.beta)
        if self.uncertainty:
            self.spread[name].mul_(self.beta_u).add_((s - mean).abs(), alpha=1 - self.beta_u)
        self.steps[name] += 1

    def step(self) -> None:
        """Update every layer from the gradients now in ``.grad`` (call after ``backward``)."""
        for name in self.layers:
            self._update(name, self._factor(name))

    def attach(self) -> ImportanceTracker:
        """Update automatically after each backward (gradient hooks on one factor per layer)."""
        self.detach()
        for name in self.layers:
            factor = self._factor(name)
            self._handles.append(factor.register_post_accumulate_grad_hook(
                lambda p, name=name: self._update(name, p)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def scores(self) -> dict[str, Tensor]:
        """Per layer, one score per component (CPU float tensors; zeros for layers never updated)."""
        out = {}
        for name, layer in self.layers.items():
            mean = self.mean.get(name)
            if mean is None:
                out[name] = torch.zeros(layer.rank(self.task))
                continue
            # Bias-corrected EMA (as Adam), so that few steps do not shrink every score alike.
            corr = 1 - self.beta ** max(self.steps[name], 1)
            score = mean / corr
            if self.uncertainty:
                score = score * self.spread[name] / (1 - self.beta_u ** max(self.steps[name], 1))
            out[name] = score.detach().cpu().clone()
        return out


@torch.no_grad()
def magnitude_scores(model: Any, task: str) -> dict[str, Tensor]:
    """Per component, ‖a_r‖·‖b_r‖·‖c_r‖ / ‖W_l‖: how much it changes its layer's weight."""
    out = {}
    for name, layer in model.adapted_layers().items():
        if task not in layer.tasks:
            continue
        norms = torch.ones(layer.rank(task))
        for factor in layer.tasks[task].factors:
            norms = norms * factor.detach().float().norm(dim=0).cpu()
        out[name] = norms / layer.base.weight.detach().float().norm().clamp_min(1e-12).cpu()
    return out


# ----------------------------------------------------------------------------- selection
def select_components(model: Any, scores: Mapping[str, Tensor], budget: int | float) -> dict[str, list[int]]:
    """Which scored components to keep under ``budget``: per layer, the indices (best first).

    Greedy knapsack on importance per parameter: every component of every layer is ranked by
    ``score / cost`` (cost = Σ_k d_k of its layer) and kept while it fits the remaining budget and
    its layer's rank cap; a component that does not fit is skipped and cheaper ones are still
    tried. Components with a zero (or non-finite) score are never kept. Layers without scores, or
    with none kept, get an empty list (rank 0)."""
    kept = allocate(model, budget, scores).kept
    assert kept is not None
    return kept


def _knapsack(count: int, caps: Mapping[str, int], costs: Mapping[str, int],
              scores: Mapping[str, Tensor]) -> dict[str, list[int]]:
    unknown = sorted(set(scores) - set(costs))
    if unknown:
        raise ConfigError(f"scores given for layers this model does not adapt: {unknown[:5]}")
    items = []
    for name, values in scores.items():
        values = torch.as_tensor(values, dtype=torch.float64).flatten().tolist()
        for index, score in enumerate(values):
            if math.isfinite(score) and score > 0:
                items.append((score / costs[name], score, name, index))
    items.sort(key=lambda item: (-item[0], -item[1], item[2], item[3]))  # deterministic ties
    kept: dict[str, list[int]] = {name: [] for name in costs}
    left = count
    for _, _, name, index in items:
        if costs[name] <= left and len(kept[name]) < caps[name]:
            kept[name].append(index)
            left -= costs[name]
    return kept


def allocate_ranks(model: Any, task: str | None, scores: Mapping[str, Tensor], budget: int | float) -> dict[str, int]:
    """Per-layer ranks (0 allowed) for ``budget`` from per-component ``scores`` of task ``task``
    (e.g. ``ImportanceTracker(model, task).scores()``); every adapted layer is listed. ``task``,
    when given, checks that each layer's scores match its rank there."""
    if task is not None:
        layers = model.adapted_layers()
        for name, values in scores.items():
            if name in layers and len(torch.as_tensor(values).flatten()) != layers[name].rank(task):
                raise ConfigError(f"layer {name!r}: {len(torch.as_tensor(values).flatten())} scores for "
                                  f"{layers[name].rank(task)} components of task {task!r}")
    return allocate(model, budget, scores).ranks
