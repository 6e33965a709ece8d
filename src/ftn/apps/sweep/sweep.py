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

import copy
import csv
import io
import itertools
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...core.io import atomic_write_bytes
from ...core.errors import ConfigError
from ...training.config import ExperimentConfig, apply_overrides, config_to_dict, setting_class
from ...training.methods import delta_used, method_class
from ...training.stats import Interval, mean_std, paired_interval, paired_t_interval

__all__ = ["Axis", "SweepSpec", "Run", "parse_axis", "parse_lr_grid", "lr_grids", "choose_lr", "plan", "run_sweep",
           "DEFAULT_LR_FACTORS", "DEFAULT_LR_EXTEND", "QUICK"]

#: Default learning-rate grid: each method's own rate (from its base config) times these. Three
#: rates, so a choice can be interior; a choice at an edge extends the grid (``DEFAULT_LR_EXTEND``).
DEFAULT_LR_FACTORS = (0.5, 1.0, 2.0)
#: When the chosen rate is the grid's lowest or highest, the sweep trains one more rate beyond it
#: (the grid's own ratio between neighbours) and chooses again, at most this many times in each
#: direction; a choice still at an edge then is reported (``lr_at_edge``).
DEFAULT_LR_EXTEND = 2
#: ``--quick``: two steps per task on a small slice (CI).
QUICK = ["train.max_steps=2", "train.epochs=1", "data.train_limit=32", "data.val_limit=16", "data.test_limit=32",
         "train.recalibrate_batches=2", "train.warmup_steps=0"]
#: Keys a grid axis may not set: the sweep sets them itself.
_RESERVED = {"method.name": "--methods", "seed": "--seeds", "train.lr": "--lr-grid", "output_dir": "--output",
             "train.resume": "the sweep (always true)", "train.evaluate_test": "the sweep"}


# ----------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class Axis:
    """One ``--grid`` axis: a config key, its values (override strings) and the methods it applies
    to (None: every method)."""

    key: str
    values: tuple[str, ...]
    methods: tuple[str, ...] | None = None

    def applies(self, method: str) -> bool:
        return self.methods is None or method in self.methods


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets (``data.crop=[48,48],[64,64]`` has two values)."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{(" and 1 or (-1 if ch in "]})" else 0)
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def parse_axis(text: str) -> Axis:
    """``[method,method:]key=v1,v2,...``: e.g. ``ftn:method.ftn.rank=1,2,4`` or ``train.epochs=3,5``."""
    key, sep, values = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--grid {text!r} is not of the form [method,...:]key=v1,v2,...")
    methods = None
    if ":" in key:
        names, _, key = key.partition(":")
        methods = tuple(m.strip() for m in names.split(",") if m.strip())
    key = key.strip()
    if key in _RESERVED:
        raise ConfigError(f"--grid {key}: set by {_RESERVED[key]}, not a grid axis")
    vals = tuple(_split_top(values))
    if not vals:
        raise ConfigError(f"--grid {text!r} has no values")
    if len(set(vals)) != len(vals):
        raise ConfigError(f"--grid {key}: repeated values {list(vals)}")
    return Axis(key, vals, methods)


def _lr_text(lr: float) -> str:
    return f"{lr:.3g}"


def parse_lr_grid(items: Sequence[str]) -> dict[str, list[float]]:
    """``method=lr1,lr2,...`` items → {method: rates}."""
    grids: dict[str, list[float]] = {}
    for item in items:
        method, sep, values = item.partition("=")
        try:
            rates = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            rates = []
        if not sep or not method.strip() or not rates or any(r <= 0 for r in rates):
            raise ConfigError(f"--lr-grid {item!r} is not of the form method=lr1,lr2,... (positive numbers)")
        grids[method.strip()] = [float(_lr_text(r)) for r in rates]
    return grids


def lr_grids(methods: Sequence[str], base_lr: dict[str, float], given: dict[str, list[float]] | None = None,
             factors: Sequence[float] = DEFAULT_LR_FACTORS) -> dict[str, list[float]]:
    """Each method's learning rates: the given ones, else its base rate × ``factors``. Every
    method gets the same number of rates (a fair search)."""
    given = given or {}
    unknown = sorted(set(given) - set(methods))
    if unknown:
        raise ConfigError(f"--lr-grid names method(s) {unknown} that are not in --methods {list(methods)}")
    grids = {m: given.get(m) or sorted({float(_lr_text(base_lr[m] * f)) for f in factors}) for m in methods}
    sizes = {m: len(g) for m, g in grids.items()}
    if len(set(sizes.values())) > 1:
        raise ConfigError(f"every method needs the same number of learning rates, got {sizes}")
    return grids


def choose_lr(candidates: Sequence[tuple[float, float | None]]) -> float:
    """The learning rate with the best validation score of ``(lr, score)`` pairs (ties: the
    first). One candidate needs no score; several need a validation split."""
    if len(candidates) == 1:
        return candidates[0][0]
    missing = [lr for lr, s in candidates if s is None or math.isnan(s)]
    if missing:
        raise ConfigError("choosing the learning rate needs a validation split (no validation score for "
                          f"lr {', '.join(map(_lr_text, missing))}); set one (data.val_limit, data.val_split, "
                          "...) or give one rate per method")
    best = max(s for _, s in candidates)  # type: ignore[type-var]
    return next(lr for lr, s in candidates if s == best)


# ----------------------------------------------------------------------------- runs
@dataclass
class Run:
    method: str
    point: tuple[tuple[str, str], ...]  # (key, value) of each axis that applies to the method
    lr: float
    seed: int
    cfg: ExperimentConfig
    folder: Path
    tuned: tuple[tuple[str, str], ...] = ()  # (key, value) of each --tune axis (chosen on validation)

    @property
    def tuned_name(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.tuned)

    @property
    def point_name(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.point) or "default"

    @property
    def group(self) -> tuple[str, str]:
        return self.method, self.point_name


def _folder_name(point: tuple[tuple[str, str], ...]) -> str:
    return "__".join(re.sub(r"[^A-Za-z0-9._=-]+", "_", f"{k}={v}") for k, v in point) or "default"


@dataclass
class SweepSpec:
    """What :func:`run_sweep` runs. ``base(method)`` is the method's config (any setting, the
    trailing overrides applied) and its own learning rate the default grid is centred on."""

    base: Callable[[str], ExperimentConfig]
    methods: list[str]
    output: Path
    axes: list[Axis] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    lr_grid: dict[str, list[float]] = field(default_factory=dict)  # given rates (others: factors)
    lr_factors: tuple[float, ...] = DEFAULT_LR_FACTORS
    lr_extend: int = DEFAULT_LR_EXTEND  # extensions of an edge choice per direction (0: none)
    # Hyper-parameters chosen on validation with the learning rate (the product of their values and
    # the LR grid is searched with the first seed), e.g. TAPS's λ: taps:method.taps.penalty=0.1,1,10.
    tune: list[Axis] = field(default_factory=list)
    workers: int = 1
    reference: str | None = None  # compared against every other method (default: ftn, else the first)
    # Also compare, within each method, grid points that differ only in this axis: its first
    # value (the reference) against each other value, e.g. budget allocation auto vs uniform.
    compare_axis: str | None = None
    # The group the multi-task gain Δm is measured against ("full[data.joint=false]": method
    # and grid point), for settings with headline metrics per task (dense); None: no Δm.
    gain_reference: str | None = None
    progress: bool = True
    command: str = ""
    bootstrap: int = 2000


def _check(spec: SweepSpec) -> dict[str, ExperimentConfig]:
    """Validate names and every axis value against each method's config (errors name the key)."""
    if not spec.methods:
        raise ConfigError("--methods is empty")
    if len(set(spec.methods)) != len(spec.methods):
        raise ConfigError(f"--methods lists a method twice: {spec.methods}")
    if not spec.seeds or len(set(spec.seeds)) != len(spec.seeds):
        raise ConfigError(f"--seeds must be distinct and non-empty, got {spec.seeds}")
    for m in spec.methods:
        try:
            method_class(m)  # unknown names fail with the registry's names
        except ConfigError as exc:
            raise ConfigError(f"--methods: {exc}") from None
    keys = [a.key for a in spec.axes + spec.tune]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"a --grid / --tune key is given twice: {keys}")
    if spec.lr_extend < 0:
        raise ConfigError(f"--lr-extend must be >= 0, got {spec.lr_extend}")
    for axis in spec.axes + spec.tune:
        for m in axis.methods or ():
            if m not in spec.methods:
                raise ConfigError(f"--grid/--tune {m}:{axis.key}: method {m!r} is not in --methods {spec.methods}")
    if spec.reference is not None and spec.reference not in spec.methods:
        raise ConfigError(f"--reference {spec.reference!r} is not in --methods {spec.methods}")
    if spec.compare_axis is not None and spec.compare_axis not in {a.key for a in spec.axes}:
        raise ConfigError(f"--compare-axis {spec.compare_axis!r} is not a --grid axis "
                          f"({sorted(a.key for a in spec.axes) or 'none given'})")
    bases = {m: spec.base(m) for m in spec.methods}
    for m, cfg in bases.items():
        for axis in spec.axes + spec.tune:
            if axis.applies(m):
                for value in axis.values:
                    try:
                        apply_overrides(copy.deepcopy(cfg), [f"{axis.key}={value}"])
                    except ConfigError as exc:
                        raise ConfigError(f"--grid {axis.key}={value} (method {m}): {exc}") from None
    return bases


def _run_config(base: ExperimentConfig, point: tuple[tuple[str, str], ...], lr: float, seed: int,
                folder: Path) -> ExperimentConfig:
    """The base config at a grid point, learning rate and seed. ``train.head_lr`` (when set)
    moves with ``train.lr`` by the same factor, keeping the base config's ratio (so the linear
    probe, whose only parameters are its head, is searched too)."""
    cfg = apply_overrides(copy.deepcopy(base), [f"{k}={v}" for k, v in point])
    overrides = [f"train.lr={lr!r}", f"seed={seed}", f"output_dir={folder}", "train.resume=true",
                 "train.evaluate_test=false", f"name={base.method.name}-{_folder_name(point)}-lr{_lr_text(lr)}-s{seed}"]
    if cfg.train.head_lr is not None:
        overrides.append(f"train.head_lr={cfg.train.head_lr * lr / cfg.train.lr!r}")
    return apply_overrides(cfg, overrides)


def plan(spec: SweepSpec, bases: dict[str, ExperimentConfig], grids: dict[str, list[float]]
         ) -> dict[tuple[str, str], dict[str, Any]]:
    """The groups (method, grid point): the point, the search runs (first seed: every learning
    rate of the grid × every combination of the --tune values) and a maker of runs
    (``make(lr, seed, tuned)``) for the extended rates and the other seeds."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for m in spec.methods:
        axes = [a for a in spec.axes if a.applies(m)]
        tune = [a for a in spec.tune if a.applies(m)]
        for values in itertools.product(*(a.values for a in axes)):
            point = tuple((a.key, v) for a, v in zip(axes, values))
            root = spec.output / "runs" / m / _folder_name(point)

            def make(lr: float, seed: int, tuned: tuple[tuple[str, str], ...] = (), m: str = m, point=point,
                     root: Path = root) -> Run:
                folder = (root / _folder_name(tuned) if tuned else root) / f"lr{_lr_text(lr)}" / f"seed{seed}"
                return Run(m, point, lr, seed, _run_config(bases[m], point + tuned, lr, seed, folder), folder, tuned)

            combos = [tuple((a.key, v) for a, v in zip(tune, vs)) for vs in itertools.product(*(a.values for a in tune))]
            search = [make(lr, spec.seeds[0], tuned) for tuned in combos for lr in grids[m]]
            groups[search[0].group] = {"method": m, "point": point, "search": search, "make": make,
                                       "lr_extended": [], "extensions": {"up": 0, "down": 0}}
    return groups


def _best(runs: Sequence[Run]) -> Run:
    """The run with the best validation score (ties: the first), by :func:`choose_lr`'s rule
    and checks (several runs need a validation split)."""
    return runs[choose_lr([(i, _val_score(r)) for i, r in enumerate(runs)])]


def _choose(g: dict[str, Any]) -> None:
    """The group's (learning rate, tuned values) with the best validation score among its search
    runs (ties: the first); sets ``lr``, ``tuned`` and ``val_scores``."""
    best = _best(g["search"])
    g["lr"], g["tuned"] = best.lr, best.tuned
    g["val_scores"] = {r.lr: _val_score(r) for r in g["search"] if r.tuned == g["tuned"]}


def _extensions(groups: dict[tuple[str, str], dict[str, Any]], spec: SweepSpec) -> list[Run]:
    """One more rate beyond the edge for every group whose chosen rate is its grid's lowest or
    highest (at the chosen tuned values), while the limit allows; returns the new runs."""
    new = []
    for g in groups.values():
        rates = sorted(g["val_scores"])
        if spec.lr_extend == 0 or len(rates) < 2:
            continue
        if g["lr"] == rates[-1] and g["extensions"]["up"] < spec.lr_extend:
            lr, side = float(_lr_text(rates[-1] * rates[-1] / rates[-2])), "up"
        elif g["lr"] == rates[0] and g["extensions"]["down"] < spec.lr_extend:
            lr, side = float(_lr_text(rates[0] * rates[0] / rates[1])), "down"
        else:
            continue
        g["extensions"][side] += 1
        g["lr_extended"].append(lr)
        run = g["make"](lr, spec.seeds[0], g["tuned"])
        g["search"].append(run)
        new.append(run)
    return new


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
_PLACEMENT = {"train.device", "output_dir", "train.recompute_depthwise"}


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


def _val_score(run: Run) -> float | None:
    tasks = _results(run)["tasks"]
    scores = [t.get("val_score") for t in tasks.values()]
    return None if not scores or any(s is None for s in scores) else float(np.mean(scores))


def _results(run: Run) -> dict[str, Any]:
    return json.loads((run.folder / "results.json").read_text())


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


def _best_per_tuned(g: dict[str, Any]) -> list[dict[str, Any]]:
    """For every combination of --tune values: its search run with the best validation score."""
    combos = list(dict.fromkeys(r.tuned for r in g["search"]))
    return [{"tuned": dict(t), "run": _best([r for r in g["search"] if r.tuned == t])} for t in combos]


def _tuning_summary(g: dict[str, Any]) -> list[dict[str, Any]]:
    """Per --tune combination (at its best rate, first seed): validation and test score, stored
    parameters, and what the method reports of itself (TAPS: layers switched on per task)."""
    out = []
    for t in g["tuning"]:
        run = t["run"]
        res = _results(run)
        test = json.loads((run.folder / "test.json").read_text())
        tasks = res.get("method_info", {}).get("tasks", {})
        on = [v["adapted_layers"] for v in tasks.values() if "adapted_layers" in v]
        out.append({"tuned": t["tuned"], "lr": run.lr, "seed": run.seed, "val_score": _val_score(run),
                    "test_score": float(np.mean([x["score"] for x in test.values()])),
                    "stored_params": res["stored_parameters"], "chosen": run.tuned == g["tuned"],
                    "layers_on": on, "gated_layers": [v["gated_layers"] for v in tasks.values() if "gated_layers" in v]})
    return out


def _rows(groups: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run: its grid and tuned values, rate, seed, whether it is a chosen run,
    per-task metrics, scores, parameters and time."""
    keys = sorted({k for g in groups.values() for k, _ in g["point"]})
    tuned_keys = sorted({k for g in groups.values() for r in g["search"] for k, _ in r.tuned})
    rows = []
    for g in groups.values():
        chosen = {id(r) for r in g["chosen"]}
        for run in [*g["search"], *g["chosen"][1:]]:
            res = _results(run)
            row: dict[str, Any] = {"method": run.method, "grid_point": run.point_name}
            row.update({k: dict(run.point).get(k, "") for k in keys})
            row.update({k: dict(run.tuned).get(k, "") for k in tuned_keys})
            row.update({"lr": run.lr, "head_lr": run.cfg.train.head_lr, "seed": run.seed, "chosen": id(run) in chosen,
                        "lr_extension": run.lr in g["lr_extended"] and run.tuned == g["tuned"],
                        "val_score": _val_score(run)})
            scored = (run.folder / "test.json").is_file() and (id(run) in chosen or any(t["run"] is run for t in g["tuning"]))
            test = json.loads((run.folder / "test.json").read_text()) if scored else None
            row["test_score"] = float(np.mean([t["score"] for t in test.values()])) if test else None
            for task, r in res["tasks"].items():
                for k, v in (r["val"] or {}).items():
                    row[f"val/{task}/{k}"] = v
                for k, v in (test[task]["metrics"] if test else {}).items():
                    row[f"test/{task}/{k}"] = v
            row.update({"trainable_params": sum(res["trainable_per_task"].values()),
                        "stored_params": res["stored_parameters"], "train_seconds": res["train_seconds"],
                        "method_info": json.dumps(res.get("method_info", {})), "output": str(run.folder)})
            rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())


def _test_stats(run: Run) -> dict[str, np.ndarray] | None:
    path = run.folder / "test_examples.npz"
    if not path.is_file():
        return None
    with np.load(path) as f:
        stats = {t: f[t] for t in _results(run)["tasks"] if t in f.files}
    return stats if len(stats) == len(_results(run)["tasks"]) else None


def _objectives(cfg: ExperimentConfig, tasks: Sequence[str]) -> dict[str, Any]:
    setting = setting_class(cfg.setting)(cfg)
    return {t: setting.data(t).objective for t in tasks}


def _compare(ref: dict[str, Any], other: dict[str, Any], replicates: int) -> Interval:
    """Paired interval of ref − other over their common seeds: t over seeds plus the test
    examples' share (:func:`~ftn.training.stats.paired_interval`) where both have per-example
    statistics of the same examples, else t over seeds alone."""
    seeds = [s for s in ref["by_seed"] if s in other["by_seed"]]
    a = [ref["by_seed"][s] for s in seeds]
    b = [other["by_seed"][s] for s in seeds]
    sa, sb = [_test_stats(r) for r in a], [_test_stats(r) for r in b]
    usable = seeds and all(x is not None for x in sa + sb) and all(
        list(x) == list(y) and all(x[t].shape == y[t].shape for t in x) for x, y in zip(sa, sb))
    if usable:
        objectives = _objectives(a[0].cfg, list(sa[0]))

        def score(task: str, total: np.ndarray) -> float:
            return objectives[task].score_from_stats(total)

        return paired_interval(sa, sb, score, replicates=replicates,  # type: ignore[arg-type]
                                shared_examples=setting_class(a[0].cfg.setting).shared_examples)
    return paired_t_interval([ref["scores"][s] for s in seeds], [other["scores"][s] for s in seeds])


def _summarize(groups: dict[tuple[str, str], dict[str, Any]], spec: SweepSpec) -> dict[str, Any]:
    out_groups = []
    info = {}
    for (m, name), g in groups.items():
        by_seed = {r.seed: r for r in g["chosen"]}
        tests = {s: json.loads((r.folder / "test.json").read_text()) for s, r in by_seed.items()}
        scores = {s: float(np.mean([t["score"] for t in test.values()])) for s, test in tests.items()}
        per_task: dict[str, list[float]] = {}
        per_metric: dict[str, dict[str, list[float]]] = {}  # task → metric → one value per seed
        for test in tests.values():
            for t, v in test.items():
                per_task.setdefault(t, []).append(v["score"])
                for k, x in v["metrics"].items():
                    if isinstance(x, (int, float)):
                        # "semseg/mIoU" belongs to semseg, also in a joint model's results
                        owner, metric = k.split("/", 1) if "/" in k else (t, k)
                        per_metric.setdefault(owner, {}).setdefault(metric, []).append(float(x))
        mean, std, n = mean_std(list(scores.values()))
        first = _results(g["chosen"][0])
        entry = {"method": m, "grid_point": name, "point": dict(g["point"]), "lr": g["lr"],
                 "lr_grid": {_lr_text(k): v for k, v in sorted(g["val_scores"].items())},
                 "lr_extended": list(g["lr_extended"]), "lr_at_edge": g["lr_at_edge"],
                 "tuned": dict(g["tuned"]), "tuning": _tuning_summary(g), "mean": mean, "std": std, "seeds": n,
                 "scores": {str(s): v for s, v in scores.items()},
                 "per_task": {t: mean_std(v)[0] for t, v in per_task.items()},
                 "per_task_metrics": {t: {k: mean_std(v)[:2] for k, v in ms.items()} for t, ms in per_metric.items()},
                 "stored_params": first["stored_parameters"], "method_info": first.get("method_info", {}),
                 "train_seconds": float(np.mean([_results(r)["train_seconds"] for r in by_seed.values()]))}
        out_groups.append(entry)
        info[(m, name)] = {"by_seed": by_seed, "scores": scores, "tests": tests}
    # What is compared: every group of the reference method against every group of another
    # method, then the --compare-axis pairs within a method.
    reference = spec.reference or ("ftn" if "ftn" in spec.methods else spec.methods[0])
    pairs = [(a, b) for a in info if a[0] == reference for b in info if b[0] != reference]
    pairs += _axis_pairs(groups, spec)
    comparisons = [_comparison(a, b, _compare(info[a], info[b], spec.bootstrap)) for a, b in pairs]
    gain = _gain(out_groups, info, spec, pairs) if spec.gain_reference else None
    return {"groups": out_groups, "comparisons": comparisons, "gain": gain}


def _comparison(a: tuple[str, str], b: tuple[str, str], interval: Interval) -> dict[str, Any]:
    return {"reference": a[0], "reference_point": a[1], "method": b[0], "grid_point": b[1], **interval.to_dict()}


def _label(method: str, point: str) -> str:
    return method if point == "default" else f"{method}[{point}]"


def _flat_test_metrics(test: dict[str, Any]) -> dict[str, float]:
    """Every metric of a run's ``test.json`` by its key ("semseg/mIoU"), across its training tasks."""
    return {k: float(x) for v in test.values() for k, x in v["metrics"].items() if isinstance(x, (int, float))}


def _gain(out_groups: list[dict[str, Any]], info: dict[tuple[str, str], Any], spec: SweepSpec,
          pairs: list[tuple[tuple[str, str], tuple[str, str]]]) -> dict[str, Any]:
    """The multi-task gain Δm (%) of every group against ``spec.gain_reference``: per seed,
    (1/T) Σ_t s_t (M_t − R_t) / R_t over the setting's headline metrics, with R_t the reference
    group's mean over its seeds (so every group is measured against the same numbers); and the
    paired difference of Δm for each of ``pairs`` (the reference method's groups against every
    other method's, and the ``--compare-axis`` pairs), paired over seeds and test images
    (with R fixed, the mean over tasks of s_t (M_t(a) − M_t(b)) / R_t)."""
    labels = {_label(m, p).replace(" ", ""): (m, p) for m, p in info}
    key = labels.get(spec.gain_reference.replace(" ", ""))  # type: ignore[union-attr]
    if key is None:
        raise ConfigError(f"--gain-reference {spec.gain_reference!r} is not a group of this sweep; "
                          f"its groups: {sorted(_label(m, p) for m, p in info)}")
    cfg = next(iter(info[key]["by_seed"].values())).cfg
    setting = setting_class(cfg.setting)(cfg)
    heads = setting.gain_metrics()
    if not heads:
        raise ConfigError(f"the {cfg.setting} setting has no headline metric per task, so no Δm (--gain-reference)")
    ref_metrics = [_flat_test_metrics(t) for t in info[key]["tests"].values()]
    base = {t: float(np.mean([m[k] for m in ref_metrics])) for t, (k, _) in heads.items()}

    def term(task: str, value: float) -> float:  # one task's share of Δm (%), before the mean
        return 100 * heads[task][1] * (value - base[task]) / base[task]

    gains = {}
    for entry in out_groups:
        tests = info[(entry["method"], entry["grid_point"])]["tests"]
        values = [float(np.mean([term(t, m[k]) for t, (k, _) in heads.items()]))
                  for m in map(_flat_test_metrics, tests.values())]
        mean, std, n = mean_std(values)
        entry["gain"] = {"mean": mean, "std": std, "seeds": n, "by_seed": dict(zip(map(str, tests), values))}
        gains[(entry["method"], entry["grid_point"])] = dict(zip(tests, values))

    objectives = {t: setting.data(t).objective for t in heads}

    def score(task: str, total: np.ndarray) -> float:
        return term(task, objectives[task].metrics_from_stats(total)[heads[task][0]])

    split: dict[Path, dict[str, np.ndarray] | None] = {}  # a run's statistics per task, loaded once

    def task_stats(run: Run) -> dict[str, np.ndarray] | None:
        if run.folder not in split:
            stats = _test_stats(run)
            parts = {} if stats is None else {
                k: v for t, rows in stats.items() for k, v in setting.split_example_stats(t, rows).items()}
            split[run.folder] = {t: parts[t] for t in heads} if all(t in parts for t in heads) else None
        return split[run.folder]

    comparisons = []
    for a, b in pairs:
        seeds = [s for s in info[a]["by_seed"] if s in info[b]["by_seed"]]
        sa = [task_stats(info[a]["by_seed"][s]) for s in seeds]
        sb = [task_stats(info[b]["by_seed"][s]) for s in seeds]
        if seeds and all(x is not None for x in sa + sb):
            interval = paired_interval(sa, sb, score, replicates=spec.bootstrap,  # type: ignore[arg-type]
                                        shared_examples=setting.shared_examples)
        else:
            interval = paired_t_interval([gains[a][s] for s in seeds], [gains[b][s] for s in seeds])
        comparisons.append(_comparison(a, b, interval))
    return {"reference": _label(*key), "metrics": {t: k for t, (k, _) in heads.items()},
            "reference_values": base, "comparisons": comparisons}


def _axis_pairs(groups: dict[tuple[str, str], dict[str, Any]], spec: SweepSpec) -> list[tuple[tuple[str, str], ...]]:
    """(reference group, other group): grid points of one method that differ only in
    ``spec.compare_axis``, the axis's first value first."""
    key = spec.compare_axis
    if key is None:
        return []
    first = next(a.values[0] for a in spec.axes if a.key == key)
    out = []
    for (m, p_ref), g_ref in groups.items():
        point = dict(g_ref["point"])
        if point.get(key) != first:
            continue
        for (m2, p), g in groups.items():
            other = dict(g["point"])
            if m2 != m or p == p_ref or key not in other:
                continue
            if {k: v for k, v in other.items() if k != key} == {k: v for k, v in point.items() if k != key}:
                out.append(((m, p_ref), (m2, p)))
    return out


# ----------------------------------------------------------------------------- table and plot
_SCORE = {"classification": "top-1 accuracy (%), mean over tasks", "text": "accuracy (%), mean over tasks",
          "dense": "−weighted test loss per task (mean over images), mean over tasks (higher is better; "
                   "the multi-task gain Δm below, with --gain-reference, is the headline)"}


def _params(n: float) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k" if n >= 1e3 else f"{int(n)}"


def format_table(results: dict[str, Any]) -> str:
    """Markdown: the command, one row per (method, grid point), then the paired differences."""
    lines = []
    if results.get("command"):
        lines += [f"Regenerate: `{results['command']}`", ""]
    lines += [f"Score: {_SCORE.get(results['setting'], 'the objective score, mean over tasks')} on the test "
              f"split; mean ± std over seeds {results['seeds']}. Learning rate (and any --tune value) chosen on "
              "the validation split with the first seed among the method's grid (validation score of each rate "
              "in brackets; + a rate added because the choice was at the grid's edge; \"edge\": still at the "
              "edge after the extension limit).", ""]
    header = ["method", "grid point", "LR grid (val)", "chosen LR", "test score", "stored params", "ΔW / task",
              "train s / run"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in results["groups"]:
        delta = delta_used(g.get("method_info", {}))
        extended = {_lr_text(x) for x in g.get("lr_extended", [])}
        grid = ", ".join(("+" if lr in extended else "") + (f"{lr} ({v:.2f})" if v is not None else lr)
                         for lr, v in g["lr_grid"].items())
        chosen = _lr_text(g["lr"]) + (" (edge)" if g.get("lr_at_edge") else "")
        if g.get("tuned"):
            chosen += ", " + ", ".join(f"{k.split('.')[-1]}={v}" for k, v in g["tuned"].items())
        lines.append("| " + " | ".join([g["method"], g["grid_point"], grid, chosen,
                                        f"**{g['mean']:.2f}** ± {g['std']:.2f} (n={g['seeds']})",
                                        _params(g["stored_params"]), "—" if delta is None else _params(delta),
                                        f"{g['train_seconds']:.0f}"]) + " |")
    lines += _per_task_table(results["groups"])
    lines += _tuning_table(results["groups"])
    if results.get("gain"):
        lines += _gain_table(results)
    if results["comparisons"]:
        lines += ["", "Paired difference (reference − method) with its 95 % interval; * = significant (the "
                  "interval excludes 0). \"t over seeds + test examples\": a t-interval of the per-seed "
                  "differences whose variance adds the test set's shared share (the same examples resampled "
                  "for both methods; docs/sweep.md); \"t over seeds\": where per-example statistics are not "
                  "available.", "",
                  "| reference | method | difference | 95 % interval | interval | significant |",
                  "|---|---|---|---|---|---|"]
        lines += [_comparison_row(c) for c in results["comparisons"]]
    return "\n".join(lines)


def _tuning_table(groups: Sequence[dict[str, Any]]) -> list[str]:
    """Per --tune value: its best rate, validation and test score (first seed), stored parameters
    and, for TAPS, the layers switched on (per task)."""
    rows = []
    for g in groups:
        for t in g.get("tuning", []):
            values = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in t["tuned"].items())
            on = (", ".join(f"{a}/{b}" for a, b in zip(t["layers_on"], t["gated_layers"])) or "—")
            rows.append(f"| {g['method']} | {g['grid_point']} | {values}{' (chosen)' if t['chosen'] else ''} | "
                        f"{_lr_text(t['lr'])} | {t['val_score']:.2f} | {t['test_score']:.2f} | "
                        f"{_params(t['stored_params'])} | {on} |")
    if not rows:
        return []
    return ["", "Tuned on validation (first seed, each value at its best learning rate; the test score is "
            "shown for the curve, not used to choose):", "",
            "| method | grid point | value | LR | val score | test score | stored params | layers on per task |",
            "|---|---|---|---|---|---|---|---|", *rows]


def _gain_table(results: dict[str, Any]) -> list[str]:
    gain = results["gain"]
    metrics = ", ".join(gain["metrics"].values())
    lines = ["", f"Multi-task gain Δm (%) against {gain['reference']} (its mean over seeds: "
             + ", ".join(f"{gain['metrics'][t]} {v:.4g}" for t, v in gain["reference_values"].items())
             + f"), averaged over {metrics}; higher is better. Mean ± std over seeds:", "",
             "| method | grid point | Δm (%) | stored params | ΔW / task |", "|---|---|---|---|---|"]
    for g in results["groups"]:
        d = g["gain"]
        delta = delta_used(g.get("method_info", {}))
        lines.append(f"| {g['method']} | {g['grid_point']} | **{d['mean']:+.2f}** ± {d['std']:.2f} (n={d['seeds']}) "
                     f"| {_params(g['stored_params'])} | {'—' if delta is None else _params(delta)} |")
    lines += ["", "Paired difference of Δm (reference − method), 95 % interval (t over seeds plus the test "
              "images' share, the same images resampled for both):", "",
              "| reference | method | Δm difference | 95 % interval | interval | significant |", "|---|---|---|---|---|---|"]
    lines += [_comparison_row(c) for c in gain["comparisons"]]
    return lines


def _comparison_row(c: dict[str, Any]) -> str:
    ref = c["reference"] + ("" if c["reference_point"] == "default" else f" [{c['reference_point']}]")
    other = c["method"] + ("" if c["grid_point"] == "default" else f" [{c['grid_point']}]")
    span = "—" if c["low"] is None else f"[{c['low']:+.2f}, {c['high']:+.2f}]"
    return (f"| {ref} | {other} | {c['diff']:+.2f} | {span} | {c['kind']} (seeds={c['seeds']}) | "
            f"{'*' if c['significant'] else ''} |")


def _per_task_table(groups: Sequence[dict[str, Any]], max_columns: int = 12) -> list[str]:
    """Each task's test metrics, mean ± std over seeds (a task with one metric: one column)."""
    columns: list[tuple[str, str]] = []
    for g in groups:
        for task, metrics in g.get("per_task_metrics", {}).items():
            columns += [(task, k) for k in metrics if (task, k) not in columns and k != "loss"]
    if not columns:
        return []
    columns = columns[:max_columns]
    single = {t for t, _ in columns if sum(1 for c in columns if c[0] == t) == 1}
    header = ["method", "grid point", *(t if t in single else f"{t} {k}" for t, k in columns)]
    lines = ["", "Per task, test split (mean ± std over seeds):", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in groups:
        cells = []
        for t, k in columns:
            value = g.get("per_task_metrics", {}).get(t, {}).get(k)
            cells.append("—" if value is None else f"{value[0]:.2f} ± {value[1]:.2f}")
        lines.append("| " + " | ".join([g["method"], g["grid_point"], *cells]) + " |")
    return lines


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats with fewer (or as many) parameters and a higher score."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def _y(group: dict[str, Any], results: dict[str, Any]) -> tuple[float, float]:
    """What the plot shows of a group: its Δm where the sweep measured one, else its score."""
    source = group["gain"] if results.get("gain") else group
    return source["mean"], source["std"]


def plot(results: dict[str, Any], path: Path) -> Path:
    """Mean test score (Δm where the sweep has a gain reference) against stored parameters (log
    scale), error bars = std over seeds, grid points of a method connected, the Pareto front
    dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    points = []
    for i, method in enumerate(dict.fromkeys(g["method"] for g in results["groups"])):
        gs = sorted((g for g in results["groups"] if g["method"] == method), key=lambda g: g["stored_params"])
        ys, es = [_y(g, results)[0] for g in gs], [_y(g, results)[1] for g in gs]
        xs = [g["stored_params"] for g in gs]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=colours[i % len(colours)], label=method,
                    linestyle="-" if len(gs) > 1 else "none")
        for g in gs:
            if g["grid_point"] != "default":
                ax.annotate(g["grid_point"].split(".")[-1], (g["stored_params"], _y(g, results)[0]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
        points += list(zip(xs, ys))
        for g in gs:  # the curve over a --tune axis (first seed; Δm plots leave it out)
            tuning = sorted(g.get("tuning", []), key=lambda t: t["stored_params"])
            if len(tuning) > 1 and not results.get("gain"):
                ax.plot([t["stored_params"] for t in tuning], [t["test_score"] for t in tuning], marker=".",
                        linestyle=":", color=colours[i % len(colours)], alpha=0.7,
                        label=f"{method} over {', '.join(k.split('.')[-1] for k in tuning[0]['tuned'])} (seed {tuning[0]['seed']})")
                for t in tuning:
                    ax.annotate(", ".join(str(v) for v in t["tuned"].values()), (t["stored_params"], t["test_score"]),
                                textcoords="offset points", xytext=(4, -8), fontsize=6)
    front = pareto_front([p for p in points if not math.isnan(p[1])])
    if len(front) > 1:
        ax.plot(*zip(*front), linestyle="--", color="black", alpha=0.5, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("parameters stored for all tasks (log scale)")
    ax.set_ylabel(f"Δm (%) against {results['gain']['reference']}" if results.get("gain")
                  else _SCORE.get(results["setting"], "test score").split(",")[0])
    ax.set_title(f"{results['setting']}: mean ± std over seeds {results['seeds']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
