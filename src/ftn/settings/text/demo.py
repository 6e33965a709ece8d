"""``ftn demo --text``: five ways to adapt one pretrained MiniLM to four text tasks.

Every method is a run of the text setting (``configs/text_minilm.yaml``) through the same engine
as ``ftn train`` — AdamW, linear warm-up and decay, dynamic padding; only the method and its
learning rate differ (heads at 1e-2 everywhere):

- ``ftn``: per-task CP factors (ΔW = A·Bᵀ) on every Linear of the encoder (q, k, v, attention
  output, both MLP layers), task-specific LayerNorms, head; one frozen encoder for all tasks.
- ``lora``: Hugging Face PEFT LoRA on the same Linear layers + per-task LayerNorms + head; its
  rank is matched to FTN's ΔW budget (for Linear layers a rank-R LoRA and a rank-R FTN hold
  exactly R·(in + out) numbers each, so the ranks are equal).
- ``norm_head``: task-specific LayerNorms + head (FTN at rank 0).
- ``linear``: linear probe on the frozen encoder (more epochs: only the head learns).
- ``full``: full fine-tuning, a complete copy of the encoder per task.

``run_text_demo(output, quick, progress)`` writes ``results.json`` and ``table.md``;
``format_text_table(results)`` renders the markdown table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ...core.io import atomic_write_bytes
from ...training.config import apply_overrides, new_config
from ...training.runner import run_experiments

__all__ = ["VARIANTS", "FULL", "QUICK", "text_demo_config", "run_text_demo", "format_text_table"]

# Per method: its learning rate (the body's; the head's is 1e-2) and any other override.
VARIANTS: dict[str, list[str]] = {
    "ftn": ["train.lr=3e-3"],
    "lora": ["train.lr=3e-3"],
    "norm_head": ["train.lr=3e-3"],
    "linear": ["train.lr=1e-2", "train.epochs=10"],
    "full": ["train.lr=1e-4"],
}
COMMON = ["method.ftn.rank=8", "train.optimizer=adamw", "train.head_lr=1e-2", "train.weight_decay=0.01",
          "train.schedule=poly", "train.poly_power=1.0", "train.grad_clip=1.0", "train.epochs=2",
          "train.resume=false"]
# 320 training / 400 test examples per task, 64 tokens (≈15–20 min on 2 CPU cores), or a small
# slice (≈2–3 min).
FULL = ["data.train_limit=320", "data.test_limit=400", "data.max_len=64", "train.warmup_steps=4"]
QUICK = ["data.train_limit=64", "data.test_limit=96", "data.max_len=32", "train.warmup_steps=1"]


def text_demo_config(output: str | Path, method: str, quick: bool = False, extra: list[str] | tuple[str, ...] = ()):
    return apply_overrides(new_config("text"), [
        *COMMON, *(QUICK if quick else FULL), f"method.name={method}", *VARIANTS[method],
        f"output_dir={Path(output) / method}", f"name=text-demo-{method}", *extra])


def run_text_demo(output: str | Path, quick: bool = False, progress: bool = True,
                  methods: tuple[str, ...] = tuple(VARIANTS), extra: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Every method on every task; writes ``output/results.json`` and ``output/table.md``."""
    started = time.perf_counter()
    cfgs = [text_demo_config(output, m, quick, extra) for m in methods]

    def report(i: int, task: str, result: dict[str, Any]) -> None:
        if progress:
            print(f"[text] {methods[i]:<9} {task:<10} acc {result['test']['acc']:.1f}%", flush=True)

    summaries = run_experiments(cfgs, progress=progress, on_result=report)
    results = {"quick": quick, "methods": dict(zip(methods, summaries)),
               "seconds": round(time.perf_counter() - started, 1)}
    out = Path(output)
    atomic_write_bytes(out / "results.json", json.dumps(results, indent=2).encode())
    atomic_write_bytes(out / "table.md", (format_text_table(results) + "\n").encode())
    return results


_LABELS = {"ftn": "FTN (ΔW + LN + head)", "lora": "LoRA, matched budget (+ LN + head)",
           "norm_head": "LayerNorm + head", "linear": "linear probe", "full": "full fine-tuning"}


def _count(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} k"
    return f"{int(n)}"


def format_text_table(results: dict[str, Any]) -> str:
    """Markdown: accuracy per task and mean, trainable parameters per task (mean over tasks;
    heads differ with the number of classes), stored parameters for all tasks, train time."""
    first = next(iter(results["methods"].values()))
    tasks = list(first["tasks"])
    header = ["method", *tasks, "mean", "trainable / task", "stored (all tasks)", "time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, s in results["methods"].items():
        label = _LABELS.get(method, method)
        info = s["method_info"]
        if "lora_rank" in info:
            label += f", r={info['lora_rank']}"
        elif method == "ftn":
            label += f", R={info['rank']}"
        trainable = sum(s["trainable_per_task"].values()) / len(tasks)
        cells = [label, *(f"{s['tasks'][t]['test']['acc']:.1f}" for t in tasks), f"**{s['mean_test_acc']:.1f}**",
                 _count(trainable), _count(s["stored_parameters"]), f"{s['wall_seconds']:.0f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    sizes = ", ".join(f"{t}: {v['classes']} classes, {v['train']} train / {v['test']} test"
                      for t, v in first["task_sizes"].items())
    lines.append("")
    lines.append(f"Accuracy in % on the test split ({sizes}); backbone {_count(first['backbone_parameters'])} "
                 f"parameters, stored once except for full fine-tuning.")
    return "\n".join(lines)
