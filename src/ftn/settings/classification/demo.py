"""``ftn demo``: FTN against every baseline on the embedded multi-domain benchmark.

Every method trains the same four domains, one at a time, on the same frozen ImageNet
MobileNetV2 (offline weights), with the same data, schedule and seed; only the learning rate
differs per method (full fine-tuning needs a smaller one). The table, ``results.json`` and a plot
of mean accuracy against stored parameters go to the output folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ...core.io import atomic_write_bytes
from ...training.config import ExperimentConfig, apply_overrides, new_config
from ...training.methods import method_class
from ...training.runner import cpu_count, cpu_seconds, run_experiments

__all__ = ["DEMO_METHODS", "DEFAULT_LR", "DEFAULT_HEAD_LR", "method_lr", "demo_config", "run_demo", "format_table",
           "plot_results", "write_samples"]

DEMO_METHODS = ("ftn", "full", "linear", "norm_head", "lora")  # `--methods taps ftn_unfreeze ...` adds others
# The rates a method without its own (``Method.default_lr`` / ``default_head_lr``) trains with.
DEFAULT_LR = 3e-3
DEFAULT_HEAD_LR = 3e-3


def method_lr(method: str) -> tuple[float, float]:
    """(learning rate, head learning rate) the demos train ``method`` with: its class's hand-set
    rates (``ftn sweep`` centres its default grid on them), else the defaults above."""
    cls = method_class(method)
    return cls.default_lr or DEFAULT_LR, cls.default_head_lr or DEFAULT_HEAD_LR


def _label(method: str) -> str:
    return method_class(method).display_name()

# Full run: the whole embedded benchmark (its wall time: the README's Quick start and
# docs/demo_results.json).
FULL = ["data.image_size=64", "train.epochs=5", "data.batch_size=64", "method.ftn.rank=8"]
# How `ftn demo` runs them, beyond what `ftn sweep --demo multidomain` shares (FULL): channels-last
# makes every method's CPU step 1.5-1.6x faster at 64 px (benchmarks/bench_training.py
# --channels-last; docs/performance.md) and changes results only by float rounding.
DEMO_RUN = ["train.channels_last=true"]
# Quick run (CI, a smoke test, not results): a small slice of every domain, one short epoch, smaller
# images (its measured time: the README's Quick start).
QUICK = ["data.image_size=32", "train.epochs=1", "data.batch_size=32", "data.train_limit=192",
         "data.val_limit=96", "data.test_limit=200", "method.ftn.rank=4", "train.recalibrate_batches=4"]


def demo_config(method: str, output: Path, quick: bool, extra: list[str] = ()) -> ExperimentConfig:
    lr, head_lr = method_lr(method)
    overrides = (QUICK if quick else FULL) + [
        f"method.name={method}", f"train.lr={lr}", f"train.head_lr={head_lr}",
        "train.warmup_steps=0" if quick else "train.warmup_steps=20",
        "train.resume=false", f"output_dir={output / method}", f"name=demo-{method}", "model.backbone=mobilenet_v2",
        "model.pretrained=true", *extra]
    return apply_overrides(new_config("classification"), overrides)


def run_demo(output: str | Path = "outputs/demo", quick: bool = False, methods: tuple[str, ...] = DEMO_METHODS,
             progress: bool = True, extra: list[str] = (), workers: int | None = None) -> dict[str, Any]:
    """Train ``methods`` on every domain and write the table, ``results.json`` and the plot.

    The (method, domain) runs are independent, so they train in ``workers`` processes of one torch
    thread each (default: one per CPU, at most 2). On a 2-core CPU two single-thread runs side by
    side finish sooner than one after another with two threads each: these 64-px convolutions are
    too small for a second thread to pay. Each run's result equals a sequential run's up to the
    float rounding of the thread count."""
    output = Path(output)
    workers = min(2, cpu_count()) if workers is None else workers
    started, cpu_started = time.perf_counter(), cpu_seconds()
    cfgs = [demo_config(method, output, quick, [*DEMO_RUN, *extra]) for method in methods]

    def report(i: int, task: str, res: dict[str, Any]) -> None:
        if progress:
            print(f"[{_label(methods[i])} / {task}] test {res['test']['acc']:.1f}%", flush=True)

    summaries = run_experiments(cfgs, progress=progress, workers=workers, threads=1 if workers > 1 else None,
                                on_result=report, interleave=True)
    rows = dict(zip(methods, summaries))
    for method, summary in rows.items():
        print(format_row(method, summary), flush=True)
    results = {"quick": quick, "wall_seconds": round(time.perf_counter() - started, 1), "methods": rows,
               "settings": {"quick_overrides" if quick else "overrides": [*(QUICK if quick else FULL), *DEMO_RUN],
                            "lr": {m: method_lr(m)[0] for m in methods}},
               "machine": {"workers": workers, "torch_threads_per_worker": 1 if workers > 1 else torch.get_num_threads(),
                           "cpu_count": cpu_count(), "cpu_seconds": round(cpu_seconds() - cpu_started, 1)}}
    atomic_write_bytes(output / "results.json", json.dumps(results, indent=2).encode())
    (output / "table.md").write_text(format_table(results) + "\n")
    plot_results(results, output / "accuracy_vs_parameters.png")
    if rows:
        write_samples(output / "samples", list(next(iter(rows.values()))["tasks"]))
    return results


def write_samples(folder: Path, domains: list[str], per_domain: int = 3) -> list[Path]:
    """The first test images of each domain as PNG files, ``folder/<domain>/<i>_<label>.png``:
    what the ``ftn predict`` command ``ftn demo`` prints last runs on (the benchmark itself is
    one ``.npz`` inside the package)."""
    import re

    from PIL import Image

    from .multidomain import load_multidomain

    data = load_multidomain()["domains"]
    written = []
    for domain in domains:
        if domain not in data:  # a folder dataset given by overrides: no embedded images to show
            continue
        test = data[domain]["splits"]["test"]
        (folder / domain).mkdir(parents=True, exist_ok=True)
        for i in range(min(per_domain, len(test["labels"]))):
            label = re.sub(r"[^A-Za-z0-9]+", "-", data[domain]["classes"][int(test["labels"][i])]).strip("-")
            path = folder / domain / f"{i}_{label}.png"
            Image.fromarray(test["images"][i]).save(path)
            written.append(path)
    return written


def format_row(method: str, s: dict[str, Any]) -> str:
    accs = " ".join(f"{d}={r['test']['acc']:.1f}" for d, r in s["tasks"].items())
    return f"[{_label(method)}] mean {s['mean_test_acc']:.2f}% ({accs}), stored {s['stored_parameters']:,}"


def format_table(results: dict[str, Any]) -> str:
    methods = results["methods"]
    domains = list(next(iter(methods.values()))["tasks"])
    header = ["method", *domains, "mean", "trainable / domain", "stored (all domains)", "train time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, s in methods.items():
        trainable = list(s["trainable_per_task"].values())
        tr = f"{min(trainable):,}" if min(trainable) == max(trainable) else f"{min(trainable):,}–{max(trainable):,}"
        cells = [_label(method), *(f"{s['tasks'][d]['test']['acc']:.2f}" for d in domains),
                 f"**{s['mean_test_acc']:.2f}**", tr, f"{s['stored_parameters']:,}", f"{s['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, s in results["methods"].items():
        ax.scatter(s["stored_parameters"], s["mean_test_acc"], s=60)
        ax.annotate(_label(method), (s["stored_parameters"], s["mean_test_acc"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("parameters stored for all domains (log scale)")
    ax.set_ylabel("mean top-1 accuracy (%)")
    ax.set_title("Embedded multi-domain benchmark, MobileNetV2 (ImageNet)" + (" — quick" if results["quick"] else ""))
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
