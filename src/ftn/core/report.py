"""Parameter accounting, in our convention and in the paper's.

- ``backbone``: every parameter of the shared, frozen backbone (stored once).
- per task: ``delta`` (every weight update the task stores: CP factors, and the dense ΔW of
  unfrozen layers and of TAPS layers switched on, with their scores; ``dense`` says how much of
  ``delta`` is dense, ``layers`` on how many layers the task stores an update), ``norms`` (its norm copies' affine parameters), ``head``;
  ``norm_buffers`` (BatchNorm running statistics) are stored in adapter files but are not
  parameters, so they are reported apart and not added to totals.
- ``paper_total`` = backbone + Σ_t delta_t: the paper's convention (shared convs + norms counted
  once plus each task's ΔW; per-task norms and heads are reported on top of that).
- ``total_stored`` = backbone + Σ_t (delta_t + norms_t + head_t): what all tasks really store.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .cp import max_efficient_rank

__all__ = ["LayerCap", "TaskParameters", "ParameterReport", "backbone_parameters", "parameter_report"]


@dataclass(frozen=True)
class LayerCap:
    """A layer where the requested rank was lowered because the factors would otherwise hold at
    least as many numbers as a dense ΔW (R·Σd ≥ Πd)."""

    layer: str
    requested: int
    applied: int
    max_efficient: int


@dataclass
class TaskParameters:
    delta: int
    norms: int
    head: int
    norm_buffers: int = 0
    rank: int | None = None
    caps: list[LayerCap] = field(default_factory=list)
    dense: int = 0  # of delta: dense updates (unfrozen layers, TAPS layers switched on)
    layers: int = 0  # layers the task stores an update for
    budget: int | None = None  # ΔW parameter budget the ranks were chosen for (None: a rank was given)
    layer_ranks: dict[str, int] | None = None  # per-layer ranks of a budgeted task (0: not adapted)

    @property
    def total(self) -> int:
        return self.delta + self.norms + self.head


@dataclass
class ParameterReport:
    backbone: int
    adapted_layers: int
    norm_layers: int
    tasks: dict[str, TaskParameters]

    @property
    def paper_total(self) -> int:
        return self.backbone + sum(t.delta for t in self.tasks.values())

    @property
    def total_stored(self) -> int:
        return self.backbone + sum(t.total for t in self.tasks.values())

    @property
    def per_task_delta(self) -> int | dict[str, int]:
        """ΔW per task: one number when every task has the same, else a dict."""
        deltas = {name: t.delta for name, t in self.tasks.items()}
        values = set(deltas.values())
        return values.pop() if len(values) == 1 else deltas

    def to_dict(self) -> dict:
        return {
            "backbone": self.backbone,
            "adapted_layers": self.adapted_layers,
            "norm_layers": self.norm_layers,
            "per_task_delta": self.per_task_delta,
            "paper_total": self.paper_total,
            "total_stored": self.total_stored,
            "tasks": {name: {**asdict(t), "total": t.total} for name, t in self.tasks.items()},
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        lines = [
            f"shared backbone (frozen, stored once): {self.backbone:>14,}",
            f"adapted Conv/Linear layers: {self.adapted_layers}, task-specific norm layers: {self.norm_layers}",
            "",
            f"{'task':<16}{'rank':>6}{'ΔW':>12}{'norms':>10}{'head':>10}{'total':>12}{'norm stats':>12}"
            f"{'layers':>8}{'dense ΔW':>12}",
        ]
        for name, t in self.tasks.items():
            rank = ("auto" if t.budget is not None else "-") if t.rank is None else str(t.rank)
            lines.append(f"{name:<16}{rank:>6}{t.delta:>12,}{t.norms:>10,}{t.head:>10,}{t.total:>12,}"
                         f"{t.norm_buffers:>12,}{t.layers:>8}{t.dense:>12,}")
        lines += [
            "",
            f"paper convention (backbone + Σ ΔW): {self.paper_total:>14,}",
            f"total stored (backbone + Σ task totals): {self.total_stored:>9,}",
        ]
        for name, t in self.tasks.items():
            if t.budget is not None and t.layer_ranks is not None:
                used = sum(1 for r in t.layer_ranks.values() if r)
                ranks = ", ".join(f"{ln}={r}" for ln, r in t.layer_ranks.items())
                lines.append(f"budget [{name}]: {t.budget:,} ΔW parameters, {t.delta:,} used, "
                             f"{used}/{len(t.layer_ranks)} layers adapted; ranks: {ranks}")
            for cap in t.caps:
                lines.append(f"rank cap [{name}] {cap.layer}: requested {cap.requested}, applied {cap.applied} "
                             f"(dense ΔW is smaller above rank {cap.max_efficient})")
        return "\n".join(lines)


def backbone_parameters(model: Any) -> int:
    """Parameters of the shared, frozen backbone (what a fractional budget is a fraction of)."""
    return sum(t.numel() for t in model.frozen_tensors().values() if isinstance(t, nn.Parameter))


def parameter_report(model: Any) -> ParameterReport:
    """The report of an :class:`~ftn.core.model.FTNModel` (read through its public methods):
    shared backbone, per-task ΔW / norms / head, and the paper's total."""
    layers = model.adapted_layers()
    norms = model.task_norm_layers()
    per_task = {}
    for name in model.tasks:
        spec = model.task_spec(name)
        caps = [LayerCap(ln, layer.requested_ranks[name], layer.rank(name), max_efficient_rank(layer.modes))
                for ln, layer in layers.items()
                if name in layer.requested_ranks and layer.requested_ranks[name] != layer.rank(name)]
        updates = [layer.tasks[name] for layer in layers.values() if name in layer.tasks]
        per_task[name] = TaskParameters(
            delta=sum(u.num_params() for u in updates),
            dense=sum(u.num_params() for u in updates if u.kind != "cp"),
            layers=sum(1 for u in updates if u.num_params()),
            norms=sum(p.numel() for n in norms.values() for p in n.tasks[name].parameters()),
            norm_buffers=sum(b.numel() for n in norms.values() for b in n.tasks[name].buffers()),
            head=sum(p.numel() for p in model.heads[name].parameters()),
            rank=spec.get("rank"),
            caps=caps,
            budget=spec.get("budget"),
            layer_ranks=({ln: layer.rank(name) for ln, layer in layers.items()}
                         if spec.get("budget") is not None else None),
        )
    return ParameterReport(backbone=backbone_parameters(model), adapted_layers=len(layers),
                           norm_layers=len(norms), tasks=per_task)
