"""``method.budget``: choose a task's per-layer ranks for a ΔW parameter budget before training it.

- ``method.budget_allocation=uniform``: rank R on every layer and R + 1 on as many layers as
  still fit (:func:`~ftn.core.allocation.uniform_split`), so it spends the budget as fully as ``auto``;
  with ``budget_init=probe`` (the default) it gets the same probe as ``auto`` at those ranks and
  starts from it, so the two differ only in where the ranks go (same ΔW, same steps, same head
  start).
- ``auto``: a *probe* — the task at a warm rank (``budget_warm`` × the uniform rank, capped per
  layer), trained by the normal engine for ``budget_probe`` of the task's steps (no evaluation,
  no BatchNorm recalibration) while an :class:`~ftn.core.allocation.ImportanceTracker` scores every
  rank-1 component — then a greedy knapsack on importance per parameter
  (:func:`~ftn.core.allocation.select_components`). The probe is removed; with ``budget_init=probe``
  the real task starts from the kept components and the probe's norms and head.

The decision goes to ``<output>/<task>/allocation.json`` (budget, ranks, the ΔW they use
(``delta``), scores, probe time; for ``uniform`` also ``uniform_base_rank`` and
``uniform_plus_one``, the number of layers at base + 1) and
the real task's starting state to ``allocation_init.safetensors``; a resumed run reads both and
never probes again (an interrupted probe is simply re-run: it is seeded, so it gives the same
allocation).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from ..core import allocation
from ..core.io import atomic_write_bytes
from ..core.errors import ConfigError
from .config import ExperimentConfig
from .engine import EpochBatchSampler, seed_everything, train_task
from .methods import Method
from .setting import TaskData

__all__ = ["Plan", "plan_task", "PROBE_PREFIX"]

log = logging.getLogger("ftn.train")

PROBE_PREFIX = "budget_probe_"
ALLOCATION_FILE = "allocation.json"
INIT_FILE = "allocation_init.safetensors"


@dataclass
class Plan:
    ranks: dict[str, int] | None  # per-layer ranks (None: the method's own, e.g. LoRA's matched rank)
    spec: dict[str, Any]  # recorded as the task's spec (adapter file)
    init: dict[str, Tensor] | None  # the real task's starting state (from the probe), or None
    record: dict[str, Any]  # what allocation.json holds


def task_steps(cfg: ExperimentConfig, data: TaskData) -> int:
    """The task's total training steps, as the engine computes them."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    sampler = EpochBatchSampler(len(data.train), cfg.data.batch_size, 0, min_batch=data.min_batch)  # type: ignore[arg-type]
    return cfg.train.epochs * len(sampler)


def plan_task(cfg: ExperimentConfig, method: Method, name: str, data: TaskData, make_head: Callable[[], nn.Module],
              out_dir: Path, seed: int, device: torch.device, sync: bool = True) -> Plan | None:
    """The per-layer ranks of task ``name`` for ``cfg.method.budget`` (None when no budget is set,
    or for methods that match the budget themselves, such as LoRA)."""
    mcfg = cfg.method
    model = method.factorized
    if mcfg.budget is None or model is None:
        return None
    record_path = out_dir / ALLOCATION_FILE
    if cfg.train.resume and record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("budget_request") == mcfg.budget and record.get("allocation") == mcfg.budget_allocation:
            init_path = out_dir / INIT_FILE
            init = st_load(str(init_path), device=str(device)) if init_path.is_file() else None
            log.info("%s: reusing the rank allocation in %s", name, record_path)
            return Plan(record["ranks"], record["spec"], init, record)
        log.warning("%s: %s was made for another budget; allocating again", name, record_path)
    # The budget is read once (allocation.allocate); the uniform allocation is both the
    # `uniform` arm and the measure of the probe's warm rank for `auto`.
    uniform = allocation.allocate(model, mcfg.budget)
    count, uniform_rank = uniform.count, max(uniform.base_rank, 1)
    spec = {"rank": None, "rank_pattern": None, "budget": count, "budget_request": mcfg.budget,
            "allocation": mcfg.budget_allocation}
    record: dict[str, Any] = {"budget_request": mcfg.budget, "budget": count, "allocation": mcfg.budget_allocation,
                              "uniform_rank": uniform_rank}
    init = None
    if mcfg.budget_allocation == "uniform":
        ranks = uniform.ranks
        spec["rank"] = uniform_rank
        record.update(probe_seconds=0.0, uniform_base_rank=uniform.base_rank, uniform_plus_one=len(uniform.plus_one))
        if mcfg.budget_init == "probe":
            # The control for auto's head start: the same probe (same steps), at the uniform ranks,
            # keeping every component, so auto and uniform differ only in where the ranks go.
            _, init, probe = _probe(cfg, method, name, data, make_head, out_dir, seed, device, count,
                                    uniform_rank, sync, fixed=ranks)
            record.update(probe)
    else:
        ranks, init, probe = _probe(cfg, method, name, data, make_head, out_dir, seed, device, count, uniform_rank,
                                    sync)
        record.update(probe)
    record.update(ranks=ranks, spec=spec, delta=allocation.delta_parameters(model, ranks),
                  layers={n: list(layer.modes) for n, layer in model.adapted_layers().items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    if init is not None:
        atomic_write_bytes(out_dir / INIT_FILE, st_save({k: v.cpu().contiguous() for k, v in init.items()}))
    atomic_write_bytes(record_path, json.dumps(record, indent=1).encode())
    log.info("%s: budget %d ΔW parameters, %s allocation uses %d (%.1f %%) over %d/%d layers", name, count,
             mcfg.budget_allocation, record["delta"], 100 * record["delta"] / count,
             sum(1 for r in ranks.values() if r), len(ranks))
    return Plan(ranks, spec, init, record)


def _probe(cfg: ExperimentConfig, method: Method, name: str, data: TaskData, make_head: Callable[[], nn.Module],
           out_dir: Path, seed: int, device: torch.device, count: int, uniform_rank: int,
           sync: bool, fixed: dict[str, int] | None = None) -> tuple[dict[str, int], dict[str, Tensor] | None, dict[str, Any]]:
    """Train the probe; returns (ranks, the real task's starting state, the record's entries).
    ``fixed``: probe at these ranks and keep every component (no selection)."""
    mcfg = cfg.method
    model = method.factorized
    assert model is not None  # plan_task probes factorized methods only
    caps = allocation.layer_capacities(model)
    warm = max(1, round(mcfg.budget_warm * uniform_rank)) if fixed is None else uniform_rank
    probe_ranks = {n: min(warm, c) for n, c in caps.items()} if fixed is None else fixed
    probe_name = PROBE_PREFIX + name
    total = task_steps(cfg, data)
    steps = max(2, round(mcfg.budget_probe * total))  # the first step scores nothing (ΔW = 0 there)
    probe_dir = out_dir / "probe"
    shutil.rmtree(probe_dir, ignore_errors=True)  # an interrupted probe is re-run from its start
    seed_everything(seed)
    task = method.add_task(probe_name, make_head(), ranks=probe_ranks, spec={"rank": warm, "rank_pattern": None})
    tracker = allocation.ImportanceTracker(model, probe_name).attach()
    started = time.perf_counter()
    try:
        # A short run of the normal engine: the same optimizer and schedule over the probe's steps,
        # nothing evaluated (no val/test split, no BatchNorm recalibration), nothing resumed.
        train_cfg = replace(cfg.train, max_steps=steps, resume=False, recalibrate_bn=False, checkpoint_every=0)
        train_task(task, replace(data, val=None, test=None), train_cfg, cfg.data, probe_dir, seed=seed,
                   device=device, progress=False, sync=sync)
        scores = tracker.scores() if mcfg.budget_score == "taylor" else allocation.magnitude_scores(model, probe_name)
        kept = (allocation.allocate(model, count, scores).kept if fixed is None  # the training side supplies scores
                else {n: list(range(r)) for n, r in fixed.items() if r})
        ranks = {n: len(idx) for n, idx in kept.items()}
        init = _kept_state(task.state_dict(), kept) if mcfg.budget_init == "probe" else None
    finally:
        tracker.detach()
        method.remove_task(probe_name)
        shutil.rmtree(probe_dir, ignore_errors=True)
    if not any(ranks.values()):
        raise ConfigError(f"task {name!r}: no ΔW component scored above zero in the probe; "
                          f"try method.budget_allocation=uniform or more probe steps (method.budget_probe)")
    seconds = time.perf_counter() - started
    return ranks, init, {"warm_rank": warm, "probe_steps": steps, "task_steps": total, "probe_seconds": round(seconds, 3),
                         "score": mcfg.budget_score, "init": mcfg.budget_init,
                         "scores": {n: [float(v) for v in s] for n, s in scores.items()},
                         "kept": kept}


def _kept_state(state: dict[str, Tensor], kept: dict[str, list[int]]) -> dict[str, Tensor]:
    """The probe's state with only the kept components (columns) of each layer's factors."""
    out = {}
    for key, value in state.items():
        if key.startswith("delta."):
            layer, _, _ = key[len("delta."):].rpartition(".")
            idx = kept.get(layer, [])
            if not idx:
                continue
            value = value[:, torch.tensor(sorted(idx), dtype=torch.long, device=value.device)]
        out[key] = value.clone()
    return out
