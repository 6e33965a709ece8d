"""Run an experiment of any setting: build the setting and the method, train the tasks one after
another with the engine, save each task's file and a results file; or evaluate saved tasks.

Tasks are independent, so they can also be spread over torchrun ranks
(``train.distributed=tasks``) or over local worker processes (:func:`run_experiments` with
``workers > 1``, used by the demos); the results are the same, since every task is seeded on its
own and the backbone is built from the same seed in every process.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..core.io import atomic_write_bytes
from ..core.errors import ConfigError
from . import budget, distributed
from .allocator import keep_freed_memory
from .config import ExperimentConfig, config_to_dict, setting_class
from .engine import evaluate, evaluate_examples, resolve_device, seed_everything, train_task
from .methods import Method, make_method
from .setting import Setting, TaskData

__all__ = ["build", "run_experiment", "run_experiments", "cpu_count", "cpu_seconds", "task_order", "load_tasks", "evaluate_tasks", "evaluate_task_examples"]

log = logging.getLogger("ftn.train")


def build(cfg: ExperimentConfig, device: torch.device) -> tuple[Setting, Method]:
    """The setting and the method on a freshly built, seeded backbone (the same in every process
    and in ``ftn eval``, so adapter files fit it)."""
    setting = setting_class(cfg.setting)(cfg)
    seed_everything(cfg.seed)
    backbone = setting.backbone().to(device)
    if cfg.train.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)  # 4-d weights only
    method = make_method(cfg.method, backbone, device)
    if cfg.train.recompute_depthwise:
        model = method.factorized
        if model is None:
            raise ConfigError(f"train.recompute_depthwise applies to FTN methods, not method.name="
                              f"{cfg.method.name!r}")
        if not model.recompute_depthwise():
            log.warning("train.recompute_depthwise: the backbone has no adapted depthwise conv")
    return setting, method


def _device(cfg: ExperimentConfig) -> torch.device:
    device = resolve_device(cfg.train.device)
    info = distributed.current()
    return torch.device("cuda", info.local_rank) if device.type == "cuda" and info.enabled else device


def load_tasks(setting: Setting, method: Method, files: Sequence[str | Path]) -> dict[str, TaskData]:
    """Add tasks from the files ``method.save_task`` wrote (``<task>.safetensors``); returns
    their data."""
    loaded = {}
    for path in map(Path, files):
        if not path.is_file():
            raise ConfigError(f"task file not found: {path}")
        name = path.name.removesuffix(".safetensors")
        loaded[name] = setting.data(name)
        method.load_task(name, setting.head(loaded[name]), path)
    return loaded


def _train_tasks(cfg: ExperimentConfig, setting: Setting, method: Method, names: Sequence[str],
                 device: torch.device, progress: bool, stop_after_steps: int | None = None, sync: bool = True,
                 on_result: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train ``names`` in turn; returns their results and stored parameters (picklable)."""
    out = Path(cfg.output_dir)
    order = setting.tasks()
    results = {}
    if cfg.train.keep_freed_memory:
        keep_freed_memory()
    for name in names:
        if name in method.tasks:
            raise ConfigError(f"task {name!r} is already in the model (loaded from a file)")
        data = setting.data(name)
        seed = setting.task_seed(order.index(name))
        plan = budget.plan_task(cfg, method, name, data, lambda: setting.head(data), out / name, seed, device,
                                sync=sync)
        seed_everything(seed)
        if plan is None:
            model = method.add_task(name, setting.head(data))
        else:
            model = method.add_task(name, setting.head(data), ranks=plan.ranks, spec=plan.spec)
            if plan.init is not None:
                model.load_state_dict(plan.init)
        result = asdict(train_task(model, data, cfg.train, cfg.data, out / name, seed=seed, device=device,
                                   progress=progress, stop_after_steps=stop_after_steps, sync=sync))
        if distributed.current().is_main or not sync:
            method.save_task(name, out / "adapters", info=data.info)
        if plan is not None:
            result["allocation"] = {k: plan.record.get(k) for k in
                                    ("budget", "allocation", "uniform_rank", "warm_rank", "probe_steps", "probe_seconds",
                                     "delta", "ranks")}
        log.info("%s/%s: test %s", method.name, name, result["test"])
        results[name] = result
        if on_result is not None:
            on_result(name, result)
    return {"results": results, "task_parameters": {t: method.task_parameters(t) for t in method.tasks},
            "shared_parameters": method.shared_parameters(), "backbone_parameters": method.backbone_params,
            "method_info": method.info()}


def _method_info(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The method's info; per-task entries (``tasks``, e.g. TAPS's adapted layers) from every part."""
    info = dict(parts[0]["method_info"]) if parts else {}
    if "tasks" in info:
        info["tasks"] = {t: v for part in parts for t, v in part["method_info"].get("tasks", {}).items()}
    return info


def _summary(cfg: ExperimentConfig, setting: Setting, parts: Sequence[dict[str, Any]], loaded: list[str],
             world_size: int, wall_seconds: float) -> dict[str, Any]:
    merged = {t: r for part in parts for t, r in part["results"].items()}
    results = {t: merged[t] for t in setting.tasks() if t in merged}
    per_task = {t: n for part in parts for t, n in part["task_parameters"].items()}
    shared = parts[0]["shared_parameters"] if parts else 0
    return {
        "setting": cfg.setting,
        "method": cfg.method.name,
        "method_info": _method_info(parts),
        "backbone": cfg.model.backbone,
        "backbone_parameters": parts[0]["backbone_parameters"] if parts else None,
        "tasks": results,
        "loaded_tasks": loaded,
        **setting.summarize(results),
        "trainable_per_task": {t: r["trainable_params"] for t, r in results.items()},
        "parameters": {"shared": shared, "per_task": per_task},
        "stored_parameters": shared + sum(per_task.values()),
        "world_size": world_size,
        "train_seconds": round(sum(r["train_seconds"] for r in results.values()), 2),
        # method.budget=... with auto allocation: the probes' time, on top of train_seconds
        "probe_seconds": round(sum((r.get("allocation") or {}).get("probe_seconds") or 0.0
                                   for r in results.values()), 2),
        "wall_seconds": round(wall_seconds, 2),
    }


def _write(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(payload, indent=2, default=float).encode())


def _finish(cfg: ExperimentConfig, summary: dict[str, Any]) -> None:
    """Write the run's ``results.json`` (the mark of a finished run); then, unless
    ``train.keep_checkpoints``, delete its tasks' checkpoints (only resuming reads them)."""
    out = Path(cfg.output_dir)
    _write(out / "results.json", summary)
    if not cfg.train.keep_checkpoints:
        for task in summary["tasks"]:
            for name in ("checkpoint.pt", "checkpoint.pt.prev"):
                (out / task / name).unlink(missing_ok=True)


def run_experiment(cfg: ExperimentConfig, progress: bool = True, stop_after_steps: int | None = None,
                   on_result: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train every task of the config in turn; write ``results.json`` and per-task files under
    ``output_dir`` (``<task>/log.csv``, ``<task>/result.json``, ``adapters/<task>.safetensors``).
    Under torchrun: data-parallel, or ``train.distributed=tasks`` (each rank its own tasks)."""
    started = time.perf_counter()
    info = distributed.init_distributed()
    by_task = info.enabled and cfg.train.distributed == "tasks"
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        _write(out / "config.json", config_to_dict(cfg))
    device = _device(cfg)
    setting, method = build(cfg, device)
    loaded = list(load_tasks(setting, method, cfg.method.load_adapters))
    names = setting.tasks()
    if by_task:
        names = names[info.rank::info.world_size]
    part = _train_tasks(cfg, setting, method, names, device, progress, stop_after_steps, sync=not by_task,
                        on_result=on_result)
    parts = distributed.all_gather_object(part) if by_task else [part]
    summary = _summary(cfg, setting, parts, loaded, info.world_size, time.perf_counter() - started)
    if info.is_main:
        _finish(cfg, summary)
    distributed.barrier()
    return summary


def _job(args: tuple[ExperimentConfig, str, int | None]) -> dict[str, Any]:
    """One task of one config, in a worker process."""
    cfg, name, threads = args
    if threads:
        torch.set_num_threads(threads)
    device = _device(cfg)
    setting, method = build(cfg, device)
    load_tasks(setting, method, cfg.method.load_adapters)
    return _train_tasks(cfg, setting, method, [name], device, progress=False)


def task_order(tasks: Sequence[Sequence[str]], interleave: bool) -> list[tuple[int, str]]:
    """(config index, task) in the order :func:`run_experiments` starts them: config by config,
    or round-robin over the configs (``interleave``)."""
    jobs = [[(i, name) for name in names] for i, names in enumerate(tasks)]
    if interleave:
        return [job for rank in itertools.zip_longest(*jobs) for job in rank if job is not None]
    return [job for config_jobs in jobs for job in config_jobs]


def run_experiments(cfgs: Sequence[ExperimentConfig], progress: bool = True, workers: int = 1,
                    threads: int | None = None,
                    on_result: Callable[[int, str, dict[str, Any]], None] | None = None,
                    interleave: bool = False) -> list[dict[str, Any]]:
    """Run several configs (e.g. the methods of a demo). ``workers > 1`` trains their tasks in
    that many spawned processes, each with ``threads`` torch threads, the tasks of the first
    configs first; the results equal a sequential run. ``on_result(config index, task, result)``
    is called as each task finishes.

    ``interleave``: with workers, start the tasks round-robin over the configs (every config's
    first task, then every config's second, ...). A task's training time depends on what runs
    beside it; interleaved, every config's tasks run beside the same mix of others, so the
    configs' times compare (the demo's table shows them). Config by config, a config's last
    tasks would run beside the next config's or alone."""
    if workers <= 1:
        previous = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            return [run_experiment(cfg, progress, on_result=None if on_result is None else
                                   (lambda t, r, i=i: on_result(i, t, r))) for i, cfg in enumerate(cfgs)]
        finally:
            torch.set_num_threads(previous)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm.auto import tqdm

    started = time.perf_counter()
    settings = [setting_class(cfg.setting)(cfg) for cfg in cfgs]
    for cfg in cfgs:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        _write(Path(cfg.output_dir) / "config.json", config_to_dict(cfg))
    parts: list[list[dict[str, Any]]] = [[] for _ in cfgs]
    summaries: list[dict[str, Any] | None] = [None] * len(cfgs)

    def finish(i: int) -> None:
        # As soon as its last task is done: a crash later leaves this config finished.
        cfg = cfgs[i]
        loaded = [Path(p).name.removesuffix(".safetensors") for p in cfg.method.load_adapters]
        summaries[i] = _summary(cfg, settings[i], parts[i], loaded, 1, time.perf_counter() - started)
        _finish(cfg, summaries[i])

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        order = task_order([setting.tasks() for setting in settings], interleave)
        futures = {pool.submit(_job, (cfgs[i], name, threads)): (i, name) for i, name in order}
        bar = tqdm(total=len(futures), desc="tasks", disable=not progress, leave=False)
        for future in as_completed(futures):
            i, name = futures[future]
            part = future.result()
            parts[i].append(part)
            bar.update(1)
            if on_result is not None:
                on_result(i, name, part["results"][name])
            if len(parts[i]) == len(settings[i].tasks()):
                finish(i)
        bar.close()
    for i, summary in enumerate(summaries):
        if summary is None:  # a config without tasks
            finish(i)
    return summaries  # type: ignore[return-value]


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children (the workers): the
    wall time the run would take on one dedicated core, whatever the machine's load."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def evaluate_tasks(cfg: ExperimentConfig, files: Sequence[str | Path], split: str = "test") -> dict[str, Any]:
    """Metrics of saved tasks (``ftn eval``): the method of ``cfg`` on the backbone it was trained
    on, each task's file loaded, ``split`` of its data scored with the setting's objective."""
    device = _device(cfg)
    setting, method = build(cfg, device)
    metrics = {}
    for name, data in load_tasks(setting, method, files).items():
        metrics[name] = evaluate(method.tasks[name], data, split, cfg.data.eval_batch_size, device, cfg.train.amp,
                                 cfg.data.num_workers, cfg.train.channels_last)
    return metrics


def evaluate_task_examples(cfg: ExperimentConfig, files: Sequence[str | Path], split: str = "test",
                           threads: int | None = None) -> dict[str, dict[str, Any]]:
    """As :func:`evaluate_tasks`, in one pass per task, with the objective's per-example
    statistics: ``{task: {"metrics", "score", "stats" (array or None)}}`` (``ftn sweep``)."""
    if threads:
        torch.set_num_threads(threads)
    device = _device(cfg)
    setting, method = build(cfg, device)
    out: dict[str, dict[str, Any]] = {}
    for name, data in load_tasks(setting, method, files).items():
        found = evaluate_examples(method.tasks[name], data, split, cfg.data.eval_batch_size, device, cfg.train.amp,
                                  cfg.data.num_workers, cfg.train.channels_last)
        if found is None:
            raise ConfigError(f"task {name!r} has no {split} split to evaluate")
        metrics, stats = found
        out[name] = {"metrics": metrics, "score": float(data.objective.score(metrics)), "stats": stats}
    return out
