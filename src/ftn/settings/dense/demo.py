"""``ftn demo --dense``: FTN against single-task and multi-task networks on embedded scenes.

Renders procedural indoor scenes (:mod:`ftn.settings.dense.scenes`) in the NYUD layout, then trains, on
the same offline ImageNet MobileNetV2 encoder, data, seed and schedule:

- single-task full fine-tuning (an encoder + decoder per task),
- a multi-task network (one trainable encoder, four decoders, Σ of weighted losses),
- FTN (frozen encoder; per task ΔW of rank 8, encoder BatchNorms and decoder),

and writes ``table.md``, ``results.json`` and ``predictions.png`` (input, truth and each method's
prediction for every task on a few validation scenes) to the output folder. Each method is a
config of the dense setting (``VARIANTS``) trained by the same engine as ``ftn train``; the
predictions are made from the saved task files, as ``ftn eval`` reads them.

The independent training tasks (each single-task network, each FTN task, the multi-task
network) run in two spawned processes with one torch thread each: on a 2-core machine shared
with other jobs, one thread per process is several times faster than two threads fighting over
cores (OpenMP barriers), and the two processes keep both cores busy.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ...training.config import ExperimentConfig, apply_overrides, new_config
from ...training.runner import build, cpu_count, cpu_seconds, load_tasks, run_experiments
from .scenes import CLASS_NAMES, write_nyud_layout
from .setting import compare
from .tasks import dense_task, main_metrics

__all__ = ["run_dense_demo", "format_dense_table", "dense_demo_config", "save_predictions", "write_samples", "FULL",
           "QUICK", "VARIANTS"]

_LABELS = {"single": "single-task (full FT ×4)", "mtl": "multi-task (shared encoder)", "ftn": "FTN"}

# Sizes of the two runs: scenes rendered, image size, training length (epochs over the train
# scenes, per task for single-task and FTN, in all for the multi-task network).
FULL: dict[str, Any] = {"n_train": 1000, "n_val": 200, "size": 64, "epochs": 5, "preview": (0, 1, 2, 3)}
QUICK: dict[str, Any] = {"n_train": 64, "n_val": 16, "size": 48, "epochs": 1, "preview": (0, 1)}

# Settings common to every run (``section.key=value``, as for ``ftn train``).
COMMON = [
    "model.backbone=mobilenet_v2", "model.pretrained=true", "model.output_stride=16",
    # Narrow decoders: at 64×64 the 256-wide DeepLabv3+ decoder would cost more than the encoder.
    "model.aspp_channels=64", "model.low_channels=24", "model.decoder_channels=64", "method.ftn.rank=8",
    "data.scale_min=1.0", "data.scale_max=1.25", "data.flip=true", "data.batch_size=16",
    "data.eval_batch_size=50", "data.num_workers=0", "data.edge_tolerance_px=1.0",
    "train.optimizer=adamw", "train.schedule=cosine", "train.weight_decay=0.0001",
    "train.lr=0.003", "train.head_lr=0.003", "train.grad_clip=null", "train.recalibrate_batches=20",
    "train.device=cpu", "train.resume=false",
]
# The three methods compared: one method of the registry each, with its own overrides (a
# pretrained encoder that is fine-tuned needs a smaller learning rate).
VARIANTS: dict[str, list[str]] = {
    "mtl": ["method.name=full", "data.joint=true", "train.lr=0.0005"],  # first: the longest run
    "single": ["method.name=full", "train.lr=0.0005"],
    "ftn": ["method.name=ftn"],
}


def dense_demo_config(output: str | Path, variant: str, quick: bool = False,
                      extra: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """The demo's configuration of one variant (scenes under ``output/scenes``, results under
    ``output/<variant>``)."""
    size = QUICK if quick else FULL
    output = Path(output)
    overrides = [*COMMON, *VARIANTS[variant], f"data.root={output / 'scenes'}",
                 f"data.crop=[{size['size']},{size['size']}]", f"train.epochs={size['epochs']}",
                 f"train.warmup_steps={0 if quick else 20}", f"output_dir={output / variant}",
                 f"name=dense-demo-{variant}", *extra]
    return apply_overrides(new_config("dense"), overrides)


def run_dense_demo(output: str | Path = "outputs/dense_demo", quick: bool = False, progress: bool = True,
                   extra: list[str] | tuple[str, ...] = (), workers: int = 2, n_train: int | None = None,
                   n_val: int | None = None) -> dict[str, Any]:
    """Render the scenes, train the three methods, print and write the table.

    ``extra`` are further ``section.key=value`` overrides; ``n_train`` / ``n_val`` change the
    number of scenes rendered (tests use a smaller slice than ``quick``). Returns the results
    (as in ``results.json``, plus ``"table"``)."""
    output = Path(output)
    size = QUICK if quick else FULL
    n_train = size["n_train"] if n_train is None else n_train
    n_val = size["n_val"] if n_val is None else n_val
    started = time.perf_counter()
    cpu_started = cpu_seconds()
    scenes = output / "scenes"
    write_nyud_layout(scenes, n_train, n_val, size=(size["size"], size["size"]), seed=0, workers=2)
    render_seconds = time.perf_counter() - started
    if progress:
        print(f"rendered {n_train} + {n_val} scenes of {size['size']}×{size['size']} in {render_seconds:.1f} s",
              flush=True)
    names = list(VARIANTS)
    cfgs = [dense_demo_config(output, v, quick, extra) for v in names]

    main = main_metrics()

    def report(i: int, task: str, res: dict[str, Any]) -> None:
        if progress:
            done = ", ".join(f"{k.replace('/', ' ')}={v:.3f}" for k, v in res["test"].items()
                             if k.split("/")[-1] == main.get(k.split("/")[0]))
            print(f"[{_LABELS[names[i]]} / {task}] {done}", flush=True)

    summaries = run_experiments(cfgs, progress=progress, workers=workers, threads=1, on_result=report)
    runs = compare({v: s for v, s in zip(names, summaries)}, baseline="single")
    preview = tuple(i for i in size["preview"] if i < n_val)
    order = ("single", "mtl", "ftn")
    results: dict[str, Any] = {"tasks": list(cfgs[0].data.tasks), "methods": {v: runs[v] for v in order},
                               "main_metrics": main, "quick": quick,
                               "scenes": {"train": n_train, "val": n_val, "size": size["size"],
                                          "render_seconds": round(render_seconds, 1)}}
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    results["machine"] = {"torch_threads_per_worker": 1, "workers": workers, "cpu_count": cpu_count(),
                          "cpu_seconds": round(cpu_seconds() - cpu_started, 1)}
    table = format_dense_table(results)
    results["table"] = table
    _write_json(output / "results.json", results)
    (output / "table.md").write_text(table + "\n")
    if preview:
        previews = {v: predict(cfg, preview) for v, cfg in zip(names, cfgs)}
        save_predictions(cfgs[0], previews, preview, output / "predictions.png")
    write_samples(scenes, output / "samples", size["preview"])
    if progress:  # the table is printed by the caller (`ftn demo`), once
        print(f"wall time {results['wall_seconds']:.0f} s (CPU time {results['machine']['cpu_seconds']:.0f} s); "
              f"results in {output}", flush=True)
    return results


def write_samples(scenes: Path, folder: Path, indices: tuple[int, ...]) -> list[Path]:
    """Copy a few test-split scene images to ``folder``: the images the commands ``ftn demo``
    prints last (``ftn predict`` on the demo's adapters) run on."""
    import shutil

    ids = [line.strip() for line in (scenes / "gt_sets" / "val.txt").read_text().splitlines() if line.strip()]
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i in indices[: len(ids)]:
        source = next((scenes / "images").glob(f"{ids[i]}.*"))
        written.append(Path(shutil.copyfile(source, folder / source.name)))
    return written


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    import json

    from ...core.io import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(payload, indent=2, default=float).encode())


@torch.no_grad()
def predict(cfg: ExperimentConfig, indices: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Each dense task's prediction on the given test-split scenes, from the files the run of
    ``cfg`` saved (the same path as ``ftn eval``)."""
    setting, method = build(cfg, torch.device("cpu"))
    files = sorted((Path(cfg.output_dir) / "adapters").glob("*.safetensors"))
    loaded = load_tasks(setting, method, files)
    out: dict[str, torch.Tensor] = {}
    for name, data in loaded.items():
        x = torch.stack([data.test[i]["image"] for i in indices])  # type: ignore[index]
        model = method.tasks[name]
        model.eval()
        out.update({t: y.float() for t, y in model(x).items()})
    return out


def format_dense_table(results: dict[str, Any]) -> str:
    """Markdown table: one row per method with each task's metrics (the columns of its record's
    ``table``), Δm and stored parameters."""
    tasks = results["tasks"]
    cols: list[tuple[str, str, str, float, int]] = []  # (header, task, key, scale, decimals)
    for t in tasks:
        cols += [(f"{t} {c.header}", t, c.metric, c.scale, c.digits) for c in dense_task(t).table]
    header = ["method", *(c[0] for c in cols), "Δm (%) ↑", "stored params (4 tasks)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = results["methods"].get("single", {}).get("stored_parameters")
    for m, r in results["methods"].items():
        cells = [_LABELS.get(m, m)]
        for _, t, k, s, digits in cols:
            cells.append(f"{r['metrics'][t][k] * s:.{digits}f}")
        dm = r.get("delta_m")
        cells.append("—" if dm is None else f"{100 * dm:+.2f}")
        total = r["stored_parameters"]
        ratio = f" ({total / base:.2f}×)" if base else ""
        cells.append(f"{total:,}{ratio}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- pictures
def _denorm(img: torch.Tensor) -> Any:
    from .nyud import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (img * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def save_predictions(cfg: ExperimentConfig, previews: dict[str, dict[str, torch.Tensor]], indices: tuple[int, ...],
                     path: str | Path) -> Path:
    """Grid PNG: for each validation scene a block of rows (truth, then one row per method), a
    column per task after the input, each map drawn by its task record's ``show`` (depth shares
    one colour scale per scene: the truth's range)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .nyud import NYUDMultiTask

    tasks = list(cfg.data.tasks)
    val = NYUDMultiTask(cfg.data.root, cfg.data.test_split, tasks)
    methods = [m for m in ("single", "mtl", "ftn") if m in previews]
    rows = len(indices) * (1 + len(methods))
    cols = 1 + len(tasks)
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 1.7 * rows), squeeze=False)
    r = 0
    for k, idx in enumerate(indices):
        sample = val[idx]
        for row_kind in ["truth", *methods]:
            ax_row = axes[r]
            ax_row[0].imshow(_denorm(sample["image"]))
            ax_row[0].set_ylabel("truth" if row_kind == "truth" else _LABELS[row_kind].split(" (")[0], fontsize=8)
            for j, t in enumerate(tasks):
                src = sample[t] if row_kind == "truth" else previews[row_kind][t][k]
                show = dense_task(t).show
                if show is not None:
                    arr, kw = show(src, row_kind != "truth", sample[t])
                    ax_row[1 + j].imshow(arr, **kw)
                if r == 0:
                    ax_row[1 + j].set_title(t, fontsize=9)
            if r == 0:
                ax_row[0].set_title("input", fontsize=9)
            for ax in ax_row:
                ax.set_xticks([])
                ax.set_yticks([])
            r += 1
    legend = ", ".join(f"{i} {n}" for i, n in enumerate(CLASS_NAMES))
    fig.suptitle(f"validation scenes; semseg classes: {legend}", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the title
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(run_dense_demo(sys.argv[1] if len(sys.argv) > 1 else "outputs/dense_demo", quick="--quick" in sys.argv)["table"])
