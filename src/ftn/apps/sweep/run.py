"""``ftn sweep``: a grid of runs over any config, learning rates chosen on validation, several
seeds, paired intervals, one tidy results file and the accuracy-vs-stored-parameters plot.

Protocol (``docs/sweep.md``), for each method and each point of its grid (the Cartesian product
of the ``--grid`` axes that apply to it):

1. train every learning rate of the method's grid with the first seed, the test split not
   scored (``train.evaluate_test=false``);
2. choose the learning rate with the best validation score (mean over tasks of the objective's
   score: top-1 for classification and text, −weighted loss for dense); ties go to the first;
3. train the other seeds at that learning rate, again without the test split;
4. score the test split once for every chosen run (each seed), from its saved task files, with
   per-example statistics kept (``test_examples.npz``) for the paired interval
   (:func:`~ftn.training.stats.paired_interval`: t over seeds plus the test examples' share).

Every run is a folder ``<output>/runs/<method>/<grid point>/lr<lr>/seed<seed>/`` (a run of
:func:`~ftn.training.runner.run_experiment`, ``train.resume=true``): a finished one (its
``results.json`` exists) is skipped, a partial one resumes from its checkpoints.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...core.errors import ConfigError
from ...core.io import atomic_write_bytes
from ...training.config import ExperimentConfig, config_to_dict
from .plan import Run, SweepSpec, _check, _extensions, _lr_text, lr_grids, plan
from .report import (_best_per_tuned, _choose, _results, _rows, _summarize, _write_csv, format_table,
                     plot)

__all__ = ["run_sweep"]


def _same_config(run: Run) -> None:
    """A run folder must hold the run of this config (else resuming would mix two experiments)."""
    path = run.folder / "config.json"
    if path.is_file():
        old = json.loads(path.read_text())
        new = json.loads(json.dumps(config_to_dict(run.cfg), default=float))
        # A key added to the schema after the run was made counts as the same when this run
        # leaves it at its default (the old run had that behaviour).
        default = json.loads(json.dumps(config_to_dict(ExperimentConfig(setting=run.cfg.setting)), default=float))
        # Where a run trains and writes is not part of the experiment: a sweep started on a GPU
        # can be finished on the CPU, and a sweep folder moved elsewhere resumes. Nor is
        # recomputing depthwise outputs, which changes memory, not results.
        diff = sorted(d for d in _diff(old, new, default) if d not in _PLACEMENT)[:5]
        if diff:
            raise ConfigError(f"{run.folder} holds a run of another config (differs in {', '.join(diff)}); "
                              "use another --output or remove that folder")


_MISSING = object()
_PLACEMENT = {"train.device", "output_dir", "train.recompute_depthwise", "train.keep_checkpoints"}


def _diff(a: Any, b: Any, default: Any = _MISSING, prefix: str = "") -> list[str]:
    """Keys where ``a`` (the stored config) and ``b`` differ; a key ``a`` lacks is no difference
    when ``b`` holds ``default``'s value there."""
    if isinstance(a, dict) and isinstance(b, dict):
        d = default if isinstance(default, dict) else {}
        return [x for k in set(a) | set(b) if not (k not in a and k in d and b.get(k) == d[k])
                for x in _diff(a.get(k), b.get(k), d.get(k, _MISSING), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _train(runs: Sequence[Run], spec: SweepSpec) -> list[Run]:
    """Train the runs not finished yet (resuming partial ones); returns those trained."""
    from ...training.runner import run_experiments

    for r in runs:
        _same_config(r)
    todo = [r for r in runs if not (r.folder / "results.json").is_file()]
    if todo:
        run_experiments([r.cfg for r in todo], progress=spec.progress, workers=spec.workers,
                        threads=1 if spec.workers > 1 else None)
    return todo

def _eval_job(args: tuple[ExperimentConfig, list[Path], int | None]) -> dict[str, dict[str, Any]]:
    from ...training.runner import evaluate_task_examples

    cfg, files, threads = args
    return evaluate_task_examples(cfg, files, "test", threads=threads)


def _evaluate(runs: Sequence[Run], spec: SweepSpec) -> list[Run]:
    """Score the test split of chosen runs not scored yet (``test.json``, ``test_examples.npz``)."""
    todo = [r for r in runs if not (r.folder / "test.json").is_file()]
    jobs = [(r.cfg, [r.folder / "adapters" / f"{t}.safetensors" for t in _results(r)["tasks"]],
             1 if spec.workers > 1 else None) for r in todo]
    if spec.workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(spec.workers, len(jobs)), mp_context=mp.get_context("spawn")) as pool:
            outs = list(pool.map(_eval_job, jobs))
    else:
        outs = [_eval_job(j) for j in jobs]
    for run, out in zip(todo, outs):
        stats = {t: o["stats"] for t, o in out.items() if o["stats"] is not None}
        if stats:
            buffer = io.BytesIO()
            np.savez_compressed(buffer, **stats)
            atomic_write_bytes(run.folder / "test_examples.npz", buffer.getvalue())
        payload = {t: {"metrics": o["metrics"], "score": o["score"]} for t, o in out.items()}
        atomic_write_bytes(run.folder / "test.json", json.dumps(payload, indent=2).encode())
    return todo


def _say(spec: SweepSpec, text: str) -> None:
    if spec.progress:
        print(text, flush=True)

# ----------------------------------------------------------------------------- the sweep
def run_sweep(spec: SweepSpec) -> dict[str, Any]:
    """Run (or resume) the sweep; write ``results.csv``, ``results.json``, ``table.md`` and
    ``accuracy_vs_parameters.png`` under ``spec.output``. Returns ``results.json``'s content plus
    ``"trained"`` / ``"evaluated"``: the run folders trained and test-scored by this call."""
    started = time.perf_counter()
    bases = _check(spec)
    grids = lr_grids(spec.methods, {m: c.train.lr for m, c in bases.items()}, spec.lr_grid, spec.lr_factors)
    groups = plan(spec, bases, grids)
    spec.output.mkdir(parents=True, exist_ok=True)
    n_runs = sum(len(g["search"]) for g in groups.values()) + len(groups) * (len(spec.seeds) - 1)
    _say(spec, f"sweep: {len(groups)} (method, grid point) group(s), {n_runs} runs, {spec.workers} worker(s)")

    # 1. search on the first seed (LR grid × --tune values), 2. choice on validation, extending
    # the LR grid beyond an edge choice until it is interior or the limit is reached
    trained = _train([r for g in groups.values() for r in g["search"]], spec)
    for g in groups.values():
        _choose(g)
    while extra := _extensions(groups, spec):
        _say(spec, "learning rate at the edge of its grid; extending: " +
             ", ".join(f"{r.method} [{r.point_name}] lr {_lr_text(r.lr)}" for r in extra))
        trained += _train(extra, spec)
        for g in groups.values():
            _choose(g)
    for key, g in groups.items():
        rates = sorted(g["val_scores"])
        g["lr_at_edge"] = len(rates) > 1 and g["lr"] in (rates[0], rates[-1])
        g["chosen"] = [next(r for r in g["search"] if r.lr == g["lr"] and r.tuned == g["tuned"])]
        g["chosen"] += [g["make"](g["lr"], s, g["tuned"]) for s in spec.seeds[1:]]
        tuned = f" at {g['chosen'][0].tuned_name}" if g["tuned"] else ""
        _say(spec, f"{key[0]} [{key[1]}]: validation{tuned} " +
             ", ".join(f"lr {_lr_text(lr)} → {s:.4g}" if s is not None else f"lr {_lr_text(lr)}"
                       for lr, s in sorted(g["val_scores"].items())) +
             f"; chosen {_lr_text(g['lr'])}{tuned}" + (" (still at the grid's edge)" if g["lr_at_edge"] else ""))
    # 3. the other seeds at the chosen rate, 4. the test split once per chosen run, and once for
    # the best rate of every other --tune combination (seed 0: the curve over the tuned values)
    trained += _train([r for g in groups.values() for r in g["chosen"][1:]], spec)
    for g in groups.values():
        g["tuning"] = _best_per_tuned(g) if any(r.tuned for r in g["search"]) else []
    evaluated = _evaluate([r for g in groups.values() for r in g["chosen"]] +
                          [t["run"] for g in groups.values() for t in g["tuning"] if t["run"] not in g["chosen"]], spec)

    rows = _rows(groups)
    summary = _summarize(groups, spec)
    results = {"command": spec.command, "methods": spec.methods, "seeds": spec.seeds,
               "axes": [{"key": a.key, "values": list(a.values), "methods": a.methods} for a in spec.axes],
               "lr_grid": {m: grids[m] for m in spec.methods}, "lr_extend": spec.lr_extend,
               "tune": [{"key": a.key, "values": list(a.values), "methods": a.methods} for a in spec.tune],
               "setting": next(iter(bases.values())).setting,
               "groups": summary["groups"], "comparisons": summary["comparisons"], "gain": summary["gain"], "rows": rows,
               "wall_seconds": round(time.perf_counter() - started, 1)}
    atomic_write_bytes(spec.output / "results.json", json.dumps(results, indent=2, default=float).encode())
    _write_csv(spec.output / "results.csv", rows)
    table = format_table(results)
    atomic_write_bytes(spec.output / "table.md", (table + "\n").encode())
    plot(results, spec.output / "accuracy_vs_parameters.png")
    _say(spec, "\n" + table)
    return {**results, "trained": [str(r.folder) for r in trained], "evaluated": [str(r.folder) for r in evaluated]}
