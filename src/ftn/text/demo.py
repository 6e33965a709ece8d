"""The text multi-task benchmark: five ways to adapt one pretrained MiniLM to four tasks.

Every method puts a ``Linear(384, classes)`` head on the mean-pooled token embeddings
(:class:`~ftn.text.backbone.MeanPooler`) and trains with the same loop (AdamW, linear warm-up
and decay, dynamic padding); only what is trainable, and what must be stored per task, differs:

- ``ftn``: per-task CP factors (ΔW = A·Bᵀ) on every Linear of the encoder (q, k, v, attention
  output, both MLP layers), task-specific LayerNorms, head; one frozen encoder for all tasks.
- ``full``: full fine-tuning, a complete copy of the encoder per task.
- ``linear``: linear probe on the frozen encoder's pooled features (computed once).
- ``ln_head``: task-specific LayerNorms + head (FTN at rank 0).
- ``lora``: Hugging Face PEFT LoRA on the same Linear layers + per-task LayerNorms
  (``modules_to_save``) + head; its rank is matched to FTN's ΔW budget (for Linear layers a
  rank-R LoRA and a rank-R FTN hold exactly R·(in + out) numbers each, so the ranks are equal).

``run_text_demo(output, quick, progress)`` runs all of them and writes ``results.json``;
``format_text_table(results)`` renders the markdown table.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters import atomic_write_bytes
from ..errors import ConfigError
from ..model import FTNModel
from ..norms import is_norm
from .backbone import MeanPooler, load_minilm
from .data import TextSplit, load_text_tasks

__all__ = ["TextBenchConfig", "QUICK", "FULL", "METHODS", "run_text_benchmark", "run_text_demo",
           "format_text_table"]

METHODS = ("ftn", "lora", "ln_head", "linear", "full")


@dataclass
class TextBenchConfig:
    tasks: list[str] | None = None  # None: every task in the file
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    train_per_task: int = 320
    test_per_task: int = 400
    max_len: int = 64  # tokens (the file holds up to 64)
    epochs: int = 2
    batch_size: int = 16
    eval_batch_size: int = 64
    rank: int = 8  # FTN rank; LoRA gets the rank with the same ΔW budget
    lr: dict[str, float] = field(default_factory=lambda: {"ftn": 3e-3, "lora": 3e-3, "ln_head": 3e-3,
                                                          "full": 1e-4, "linear": 1e-2})
    head_lr: float = 1e-2
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    probe_steps: int = 300  # full-batch steps of the linear probe on cached features
    seed: int = 0
    threads: int | None = None  # torch.set_num_threads; None: leave as is


FULL = TextBenchConfig()
QUICK = TextBenchConfig(train_per_task=64, test_per_task=96, max_len=32, epochs=2, batch_size=16)


# ---------------------------------------------------------------------------- one task's model
@dataclass
class _TaskModel:
    forward: Callable[[Tensor, Tensor], Tensor]
    modules: list[nn.Module]  # put in train/eval mode around training
    body: list[nn.Parameter]
    head: list[nn.Parameter]

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.body + self.head)


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _train(model: _TaskModel, data: TextSplit, cfg: TextBenchConfig, lr: float) -> int:
    groups = [g for g in ({"params": model.body, "lr": lr}, {"params": model.head, "lr": cfg.head_lr}) if g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]
    per_epoch = math.ceil(len(data) / cfg.batch_size)
    total = cfg.epochs * per_epoch
    warmup = max(1, int(cfg.warmup_fraction * total))
    g = torch.Generator().manual_seed(cfg.seed)
    for m in model.modules:
        m.train()
    step = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(len(data), generator=g)
        for start in range(0, len(data), cfg.batch_size):
            ids, mask, labels = data.batch(order[start:start + cfg.batch_size])
            for group, base in zip(opt.param_groups, base_lrs):
                group["lr"] = base * _schedule(step, total, warmup)
            loss = F.cross_entropy(model.forward(ids, mask), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for grp in groups for p in grp["params"]], 1.0)
            opt.step()
            step += 1
    for m in model.modules:
        m.eval()
    return step


@torch.no_grad()
def _predict(forward: Callable[[Tensor, Tensor], Tensor], data: TextSplit, batch_size: int) -> Tensor:
    order = torch.argsort(data.lengths, stable=True)  # similar lengths together: little padding
    preds = torch.empty(len(data), dtype=torch.long)
    for start in range(0, len(data), batch_size):
        index = order[start:start + batch_size]
        ids, mask, _ = data.batch(index)
        preds[index] = forward(ids, mask).argmax(-1)
    return preds


@torch.no_grad()
def _features(encoder: MeanPooler, data: TextSplit, batch_size: int) -> Tensor:
    order = torch.argsort(data.lengths, stable=True)
    feats = torch.empty(len(data), encoder.dim)
    for start in range(0, len(data), batch_size):
        index = order[start:start + batch_size]
        ids, mask, _ = data.batch(index)
        feats[index] = encoder(ids, mask)
    return feats


# ---------------------------------------------------------------------------- methods
def _ftn_method(encoder: MeanPooler, rank: int):
    model = FTNModel(copy.deepcopy(encoder), rank=max(rank, 1)).eval()

    def add(task: str, classes: int) -> _TaskModel:
        model.add_task(task, head=nn.Linear(encoder.dim, classes), rank=rank)
        head = {id(p) for p in model.heads[task].parameters()}
        params = model.task_parameters(task)
        return _TaskModel(lambda ids, mask: model(ids, mask, task=task), [model],
                          [p for p in params if id(p) not in head], [p for p in params if id(p) in head])

    return add, lambda: model.parameter_report().total_stored, model


def _full_method(encoder: MeanPooler):
    stored = []

    def add(task: str, classes: int) -> _TaskModel:
        body = copy.deepcopy(encoder).requires_grad_(True)
        head = nn.Linear(encoder.dim, classes)
        stored.append(sum(p.numel() for p in body.parameters()) + sum(p.numel() for p in head.parameters()))
        return _TaskModel(lambda ids, mask: head(body(ids, mask)), [body, head],
                          list(body.parameters()), list(head.parameters()))

    return add, lambda: sum(stored)


def _lora_method(encoder: MeanPooler, rank: int, budget: int):
    try:
        import peft
    except ImportError:
        raise ConfigError("method 'lora' needs Hugging Face PEFT: pip install peft") from None
    from ..training.methods import matched_lora_rank

    lora_rank = matched_lora_rank(encoder, budget) if budget else rank
    backbone = sum(p.numel() for p in encoder.parameters())
    stored = []

    def add(task: str, classes: int) -> _TaskModel:
        body = copy.deepcopy(encoder)
        targets = [n for n, m in body.named_modules() if isinstance(m, nn.Linear)]
        norms = [n for n, m in body.named_modules() if is_norm(m)]
        config = peft.LoraConfig(r=lora_rank, lora_alpha=lora_rank, lora_dropout=0.0,
                                 target_modules=targets, modules_to_save=norms)
        wrapped = peft.get_peft_model(body, config)
        head = nn.Linear(encoder.dim, classes)
        params = [p for p in wrapped.parameters() if p.requires_grad]
        stored.append(sum(p.numel() for p in params) + sum(p.numel() for p in head.parameters()))
        return _TaskModel(lambda ids, mask: head(wrapped(ids, mask)), [wrapped, head], params, list(head.parameters()))

    return add, lambda: backbone + sum(stored), lora_rank


# ---------------------------------------------------------------------------- the benchmark
def _log(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def run_text_benchmark(cfg: TextBenchConfig, output: str | Path | None = None, progress: bool = False,
                       data_path: str | Path | None = None) -> dict[str, Any]:
    """Train and test every method of ``cfg.methods`` on every task; returns (and writes to
    ``output/results.json``) accuracies, parameter counts and times."""
    unknown = set(cfg.methods) - set(METHODS)
    if unknown:
        raise ConfigError(f"unknown text method(s) {sorted(unknown)}; choose from {METHODS}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    tasks, meta = load_text_tasks(data_path)
    names = cfg.tasks if cfg.tasks is not None else list(tasks)
    missing = [t for t in names if t not in tasks]
    if missing:
        raise ConfigError(f"unknown text task(s) {missing}; the file has {list(tasks)}")
    train = {t: tasks[t]["train"].subset(cfg.train_per_task, cfg.max_len) for t in names}
    test = {t: tasks[t]["test"].subset(cfg.test_per_task, cfg.max_len) for t in names}
    classes = {t: len(meta["tasks"][t]["classes"]) for t in names}

    torch.manual_seed(cfg.seed)
    encoder = MeanPooler(load_minilm()).requires_grad_(False).eval()
    backbone_params = sum(p.numel() for p in encoder.parameters())
    results: dict[str, Any] = {
        "benchmark": "text_tasks_v1", "backbone": "all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide), mean pooling",
        "backbone_params": backbone_params, "config": asdict(cfg), "tasks": {
            t: {"classes": classes[t], "train": len(train[t]), "test": len(test[t]),
                "max_len": cfg.max_len} for t in names},
        "methods": {},
    }

    # FTN's ΔW budget per task, which LoRA is matched to.
    probe = FTNModel(copy.deepcopy(encoder), rank=max(cfg.rank, 1))
    probe.add_task("probe", rank=cfg.rank)
    ftn_delta = probe.parameter_report().tasks["probe"].delta
    del probe
    results["ftn_delta_per_task"] = ftn_delta

    for method in cfg.methods:
        torch.manual_seed(cfg.seed)
        entry: dict[str, Any] = {"accuracy": {}, "trainable_per_task": {}, "steps": {}}
        t0 = time.perf_counter()
        if method == "linear":
            heads = 0
            for t in names:
                torch.manual_seed(cfg.seed)
                x_train = _features(encoder, train[t], cfg.eval_batch_size)
                x_test = _features(encoder, test[t], cfg.eval_batch_size)
                head = nn.Linear(encoder.dim, classes[t])
                opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr["linear"], weight_decay=cfg.weight_decay)
                for _ in range(cfg.probe_steps):
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(head(x_train), train[t].labels).backward()
                    opt.step()
                with torch.no_grad():
                    acc = (head(x_test).argmax(-1) == test[t].labels).float().mean().item()
                entry["accuracy"][t] = acc
                entry["trainable_per_task"][t] = sum(p.numel() for p in head.parameters())
                entry["steps"][t] = cfg.probe_steps
                heads += entry["trainable_per_task"][t]
                _log(progress, f"[text] linear  {t:<10} acc {acc:.3f}")
            entry["stored_total"] = backbone_params + heads
        else:
            if method in ("ftn", "ln_head"):
                add, stored, _ = _ftn_method(encoder, cfg.rank if method == "ftn" else 0)
            elif method == "full":
                add, stored = _full_method(encoder)
            else:
                add, stored, lora_rank = _lora_method(encoder, cfg.rank, ftn_delta)
                entry["lora_rank"] = lora_rank
            for t in names:
                torch.manual_seed(cfg.seed)
                model = add(t, classes[t])
                entry["steps"][t] = _train(model, train[t], cfg, cfg.lr[method])
                preds = _predict(model.forward, test[t], cfg.eval_batch_size)
                acc = (preds == test[t].labels).float().mean().item()
                entry["accuracy"][t] = acc
                entry["trainable_per_task"][t] = model.trainable
                _log(progress, f"[text] {method:<7} {t:<10} acc {acc:.3f}  ({time.perf_counter() - t0:.0f} s)")
            entry["stored_total"] = stored()
        entry["mean_accuracy"] = sum(entry["accuracy"].values()) / len(names)
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        results["methods"][method] = entry
    results["seconds"] = round(time.perf_counter() - started, 1)
    if output is not None:
        out = Path(output)
        atomic_write_bytes(out / "results.json", json.dumps(results, indent=2).encode())
        atomic_write_bytes(out / "table.md", (format_text_table(results) + "\n").encode())
    return results


def run_text_demo(output: str | Path, quick: bool = False, progress: bool = True) -> dict[str, Any]:
    """``ftn demo --text``: every method on every task; ``quick`` uses small slices (≈2–3 min on
    2 CPU cores instead of ≈15–20). Writes ``output/results.json`` and ``output/table.md``."""
    return run_text_benchmark(copy.deepcopy(QUICK if quick else FULL), output=output, progress=progress)


_LABELS = {"ftn": "FTN (ΔW + LN + head)", "lora": "LoRA, matched budget (+ LN + head)",
           "ln_head": "LayerNorm + head", "linear": "linear probe", "full": "full fine-tuning"}


def _count(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} k"
    return f"{int(n)}"


def format_text_table(results: dict[str, Any]) -> str:
    """Markdown: accuracy per task and mean, trainable parameters per task (mean over tasks;
    heads differ with the number of classes), stored parameters for all tasks, train time."""
    tasks = list(results["tasks"])
    header = ["method", *tasks, "mean", "trainable / task", "stored (all tasks)", "time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, entry in results["methods"].items():
        label = _LABELS.get(method, method)
        if "lora_rank" in entry:
            label += f", r={entry['lora_rank']}"
        elif method == "ftn":
            label += f", R={results['config']['rank']}"
        trainable = sum(entry["trainable_per_task"].values()) / len(tasks)
        cells = [label, *(f"{100 * entry['accuracy'][t]:.1f}" for t in tasks), f"**{100 * entry['mean_accuracy']:.1f}**",
                 _count(trainable), _count(entry["stored_total"]), f"{entry['seconds']:.0f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    sizes = ", ".join(f"{t}: {v['classes']} classes, {v['train']} train / {v['test']} test"
                      for t, v in results["tasks"].items())
    lines.append("")
    lines.append(f"Accuracy in % on the test split ({sizes}); backbone {_count(results['backbone_params'])} "
                 f"parameters, stored once except for full fine-tuning.")
    return "\n".join(lines)
