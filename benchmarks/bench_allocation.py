"""Automatic vs uniform rank allocation at the same ΔW budget on the embedded multi-domain benchmark:
one seed, a short schedule; accuracy, ΔW used, time (probe + training) and a picture
of the chosen rank by layer depth.

    nice -n 5 python benchmarks/bench_allocation.py --out outputs/allocation \\
        --budgets 0.01 0.05 --image docs/images/allocation_multidomain.png

Every run is ``ftn.settings.classification.demo.demo_config("ftn", ...)`` (the demo's FTN recipe) with the overrides
below plus ``method.budget=<b> method.budget_allocation=<auto|uniform>``: the same keys a
``ftn sweep --grid method.budget=... --grid method.budget_allocation=auto,uniform`` uses.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ftn.settings.classification.demo import demo_config
from ftn.training.runner import run_experiment

SHORT = ["data.image_size=32", "data.batch_size=32", "data.train_limit=640", "data.val_limit=128",
         "data.test_limit=400", "train.epochs=2", "train.recalibrate_batches=4", "train.warmup_steps=0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/allocation")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.01, 0.05])
    parser.add_argument("--allocations", nargs="+", default=["uniform", "auto"])
    parser.add_argument("--image", default=None, help="where to write the rank-by-depth picture")
    parser.add_argument("--from-sweep", default=None,
                        help="draw the picture from a budget sweep's runs (its seed-0 allocation.json files) "
                             "instead of training: the folder given to `ftn sweep --output`")
    parser.add_argument("overrides", nargs="*", help="more key=value overrides")
    args = parser.parse_args()
    if args.from_sweep:
        plot(sweep_rows(Path(args.from_sweep)), Path(args.image or "allocation.png"))
        return
    out = Path(args.out)
    rows = []
    for budget in args.budgets:
        for how in args.allocations:
            tag = f"b{budget:g}_{how}"
            cfg = demo_config("ftn", out / tag, quick=False,
                              extra=[*SHORT, f"method.budget={budget}", f"method.budget_allocation={how}",
                                     *args.overrides])
            started = time.perf_counter()
            summary = run_experiment(cfg, progress=False)
            row = {"budget": budget, "allocation": how, "mean_test_acc": summary["mean_test_acc"],
                   "tasks": {t: r["test"]["acc"] for t, r in summary["tasks"].items()},
                   "train_seconds": summary["train_seconds"], "probe_seconds": summary["probe_seconds"],
                   "wall_seconds": round(time.perf_counter() - started, 1),
                   "alloc": {t: r["allocation"] for t, r in summary["tasks"].items()}}
            rows.append(row)
            print(f"[{tag}] mean {row['mean_test_acc']:.2f}% {row['tasks']} ΔW "
                  f"{[a['delta'] for a in row['alloc'].values()]} train {row['train_seconds']:.0f}s "
                  f"probe {row['probe_seconds']:.0f}s", flush=True)
    (out / "allocation_results.json").write_text(json.dumps({"overrides": SHORT + args.overrides, "rows": rows},
                                                            indent=1))
    if args.image:
        plot(rows, Path(args.image))


def sweep_rows(folder: Path, seed: int = 0) -> list[dict]:
    """Rows for :func:`plot` from a ``ftn sweep --grid method.budget=... --grid
    method.budget_allocation=...`` output: each grid point's run of ``seed``, every task's
    ``allocation.json``."""
    rows = []
    chosen = _chosen_rates(folder)
    for run in sorted((folder / "runs").glob(f"*/*/lr*/seed{seed}")):
        if chosen and float(run.parent.name[2:]) not in chosen.get(run.parent.parent.name, ()):
            continue  # a rate of the grid search that validation did not choose
        config = json.loads((run / "config.json").read_text())
        alloc = {t.parent.name: json.loads(t.read_text()) for t in sorted(run.glob("*/allocation.json"))}
        if alloc:
            rows.append({"budget": config["method"]["budget"], "allocation": config["method"]["budget_allocation"],
                         "alloc": alloc, "backbone": config["model"].get("backbone", "")})
    return rows


def _chosen_rates(folder: Path) -> dict[str, set[float]]:
    """Grid-point folder name -> the rates chosen on validation, from the sweep's ``results.json``
    (empty when there is none: then every rate's run is drawn)."""
    results = folder / "results.json"
    if not results.exists():
        return {}
    chosen: dict[str, set[float]] = {}
    for row in json.loads(results.read_text())["rows"]:
        if row.get("chosen"):
            key = "__".join(part.replace(" ", "") for part in row["grid_point"].split(","))
            chosen.setdefault(key, set()).add(float(row["lr"]))
    return chosen


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["budget"] for r in rows})
    fig, axes = plt.subplots(1, len(budgets), figsize=(5.5 * len(budgets), 3.8), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for row in rows:
            if row["budget"] != budget:
                continue
            for task, alloc in row["alloc"].items():
                ranks = list(alloc["ranks"].values())
                if row["allocation"] == "uniform":
                    ax.plot(ranks, color="black", ls="--", lw=1.2, label="uniform" if task == next(iter(row["alloc"])) else None)
                else:
                    ax.plot(ranks, marker=".", lw=1, label=f"auto: {task}")
        ax.set_title(f"budget {budget:g} of the backbone per task")
        backbone = next((r.get("backbone") for r in rows if r.get("backbone")), "mobilenet_v2")
        ax.set_xlabel(f"adapted layer (input → output, {backbone})")
        ax.set_ylabel("rank")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
