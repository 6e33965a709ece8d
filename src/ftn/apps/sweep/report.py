"""``ftn sweep``'s report: the choice of each group's learning rate (and ``--tune`` values) on
validation, the summaries over seeds, the paired intervals and the multi-task gain Δm, the
rows of ``results.csv``, the markdown table and the accuracy-vs-stored-parameters plot."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...core.errors import ConfigError
from ...core.io import atomic_write_bytes
from ...training.config import ExperimentConfig, setting_class
from ...training.methods import delta_used
from ...training.settings_registry import find_entry
from ...training.stats import Interval, mean_std, paired_interval, paired_t_interval
from .plan import Run, SweepSpec, _lr_text

__all__ = ["choose_lr", "format_table", "pareto_front", "plot"]


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

def _val_score(run: Run) -> float | None:
    tasks = _results(run)["tasks"]
    scores = [t.get("val_score") for t in tasks.values()]
    return None if not scores or any(s is None for s in scores) else float(np.mean(scores))


def _results(run: Run) -> dict[str, Any]:
    return json.loads((run.folder / "results.json").read_text())

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
def _score(setting: str) -> str | None:
    """What the setting's test score is (its ``SettingEntry.score``), None if it does not say."""
    entry = find_entry(setting)
    return entry.score if entry is not None and entry.score else None


def _params(n: float) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k" if n >= 1e3 else f"{int(n)}"


def format_table(results: dict[str, Any]) -> str:
    """Markdown: the command, one row per (method, grid point), then the paired differences."""
    lines = []
    if results.get("command"):
        lines += [f"Regenerate: `{results['command']}`", ""]
    lines += [f"Score: {_score(results['setting']) or 'the objective score, mean over tasks'} on the test "
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
                  else (_score(results["setting"]) or "test score").split(",")[0])
    ax.set_title(f"{results['setting']}: mean ± std over seeds {results['seeds']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
