"""The training engine: trains one task, of any setting and any method, top to bottom in one function.

``train_task`` runs: seeded, resumable data order → AdamW/SGD with linear warm-up and cosine or
poly decay → optional mixed precision and gradient clipping → evaluation every epoch with the best
state on the validation split kept → BatchNorm statistics recalibrated with the final weights →
test metrics. What differs between settings (the loss of a batch, the metrics, the data) comes in
the task's :class:`~ftn.training.setting.TaskData` and its objective; what differs between
methods (which parameters train, which tensors are the task's state) in the
:class:`~ftn.training.methods.TrainableTask`.

Checkpoints (every N steps and at each epoch end) hold everything a resumed run needs to end
bit-identical to an uninterrupted one on CPU: the task's state, the optimizer, scheduler and
scaler, every RNG, the step within the epoch and the best-so-far snapshot.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm.auto import tqdm

from ..core.io import atomic_write_bytes
from ..core.errors import FTNError
from ..core.norms import recalibrate_batchnorm
from . import distributed as dist
from .config import DataConfig, TrainConfig
from .methods import TrainableTask
from .setting import TaskData

__all__ = ["TaskResult", "train_task", "evaluate", "evaluate_examples", "resolve_device", "seed_everything", "NonFiniteLossError",
           "EpochBatchSampler", "recalibration_loader", "to_device", "load_checkpoint", "save_checkpoint"]

log = logging.getLogger("ftn.train")


class NonFiniteLossError(FTNError):
    """The loss became NaN or infinite."""


@dataclass
class TaskResult:
    task: str
    val: dict[str, float] | None  # metrics of the kept state on the validation split
    test: dict[str, float] | None
    best_epoch: int
    steps: int
    train_seconds: float
    trainable_params: int
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped_batches: int = 0
    val_score: float | None = None  # the objective's score of ``val`` (model selection, LR choice)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """``batch`` with every tensor in it (tuples, lists, dicts) moved to ``device``;
    ``channels_last``: its 4-d floating-point tensors (images) in channels-last layout, as
    ``train.channels_last`` puts the backbone. A conv whose input is channels-last runs
    channels-last whatever its weight's layout: FTN's W + ΔW is built in the default layout, so
    without this only methods training the backbone's own weights would get the faster layout."""
    if isinstance(batch, Tensor):
        if channels_last and batch.dim() == 4 and batch.is_floating_point():
            return batch.to(device, non_blocking=True, memory_format=torch.channels_last)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device, channels_last) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    return batch


def _batch_len(batch: Any) -> int:
    """Number of samples in a batch: the length of the first tensor in it."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    for item in batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ():
        if isinstance(item, (Tensor, dict, tuple, list)):
            try:
                return _batch_len(item)
            except ValueError:
                continue
    raise ValueError("the batch holds no tensor")


class EpochBatchSampler(Sampler[list[int]]):
    """Global batches of a permutation that depends only on (seed, epoch), started ``skip``
    samples in, so a resumed run sees exactly the remaining batches of the interrupted epoch.
    Under torchrun each rank gets its contiguous share of every global batch, so the global
    batch and sample order equal a single-process run (a last global batch smaller than the
    number of ranks, or than ``min_batch``, is dropped)."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 min_batch: int = 1) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.min_batch = rank, world_size, max(min_batch, world_size)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=g)[self.skip:]
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            if len(batch) < self.min_batch:
                return
            if self.world_size > 1:
                batch = torch.tensor_split(batch, self.world_size)[self.rank]
            yield batch.tolist()

    def __len__(self) -> int:
        remaining = self.size - self.skip
        full, last = divmod(remaining, self.batch_size)
        return full + (1 if last >= self.min_batch else 0)


def _autocast(amp: str, device: torch.device):
    """(context, GradScaler or None) for the configured mixed precision."""
    if amp == "auto":
        if device.type != "cuda":
            return nullcontext(), None
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp == "off":
        return nullcontext(), None
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 and device.type == "cuda" else None
    return torch.autocast(device.type, dtype=dtype), scaler


def _lr_factor(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine (to ``min_lr_ratio``) or poly decay."""
    warmup = cfg.warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if cfg.schedule == "poly":
            return (1.0 - progress) ** cfg.poly_power
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def _optimizers(model: TrainableTask, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """The task's optimizers, the main one first. Main parameter groups: the body at ``lr``, the
    head at ``head_lr``, and the ``extra_groups`` without an optimizer of their own at their own
    rates; an extra group with ``"optimizer": factory`` gets ``factory(params, lr)`` of its own.
    All follow the same schedule."""
    shared = [g for g in model.extra_groups if not g.get("optimizer")]
    groups = [g for g in ({"params": model.body_params, "lr": cfg.lr},
                          {"params": model.head_params, "lr": cfg.head_lr or cfg.lr},
                          *({"params": g["params"], "lr": g["lr"]} for g in shared)) if g["params"]]
    # foreach: one multi-tensor op per update term instead of a Python loop over the tensors.
    # PyTorch takes it by default only on accelerators; on the CPU it gives bit-identical updates
    # (tests/training/test_engine.py) and halves the optimizer step of a task with hundreds of
    # small factor tensors (MobileNetV2 FTN: 262 tensors, 6.5 → 3.6 ms per step, 1 thread).
    # train.compile also compiles the main optimizer's step (train_task's main_step). PyTorch's recipe for
    # that: the rates as tensors on the parameters' device, so the schedule writes a new value into
    # the same tensor (LRScheduler fills it) instead of a new constant that would recompile the step
    # every time; AdamW takes tensor rates only with capturable=True, which also keeps its step
    # counters on the device (no reads of a CPU counter, a CUDA graph can replay the step).
    compiled = cfg.compile != "off"
    # The schedule's base rates stay floats ("initial_lr", which LRScheduler would otherwise clone
    # from the tensor): it then fills each tensor from a float, never reading one back from the device.
    if compiled:
        groups = [{**g, "lr": _rate_tensor(g["lr"], g["params"]), "initial_lr": float(g["lr"])} for g in groups]
    lr = groups[0]["lr"] if groups else cfg.lr  # the default rate of the groups' kind (a tensor only when compiled)
    if cfg.optimizer == "adamw":
        main = torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay, foreach=True, capturable=compiled)
    else:
        main = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True)
    # A group with an optimizer of its own (TAPS's scores: SGD with a proximal L1 step) is built
    # by the factory it carries, from its parameters and rate.
    own = [g["optimizer"](g["params"], g["lr"]) for g in model.extra_groups if g.get("optimizer") and g["params"]]
    return [main, *own]


def _rate_tensor(rate: float | Tensor, params: list[Tensor]) -> Tensor:
    """A learning rate as a 0-dim fp32 tensor on the device of the group's parameters."""
    return torch.as_tensor(float(rate), dtype=torch.float32, device=params[0].device)


def _own_optimizer_params(model: TrainableTask) -> set[int]:
    return {id(p) for g in model.extra_groups if g.get("optimizer") for p in g["params"]}


@torch.no_grad()
def evaluate(model: TrainableTask, data: TaskData, split: str, batch_size: int, device: torch.device,
             amp: str = "off", num_workers: int = 0, channels_last: bool = False) -> dict[str, float] | None:
    """The objective's metrics on ``data.<split>`` (None if that split is absent or empty);
    ``channels_last``: image batches in that layout (:func:`to_device`)."""
    dataset = getattr(data, split)
    if dataset is None or len(dataset) == 0:  # type: ignore[arg-type]
        return None
    model.eval()
    info = dist.current()
    if info.enabled and data.objective.sharded:  # each rank scores its share; the objective sums
        dataset = Subset(dataset, range(info.rank, len(dataset), info.world_size))  # type: ignore[arg-type]
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=data.collate)
    context, _ = _autocast(amp, device)
    with context:
        return data.objective.metrics(model, (to_device(b, device, channels_last) for b in loader))


@torch.no_grad()
def evaluate_examples(model: TrainableTask, data: TaskData, split: str, batch_size: int, device: torch.device,
                      amp: str = "off", num_workers: int = 0,
                      channels_last: bool = False) -> tuple[dict[str, float], np.ndarray | None] | None:
    """``(metrics, per-example statistics)`` of ``data.<split>`` in one pass, in the split's order
    (None if the split is absent or empty). The statistics are the objective's
    :meth:`~ftn.training.setting.Objective.example_stats` (rows sum back to the metrics); when the
    objective has none, they are None and the metrics come from :meth:`Objective.metrics`.
    One process (not sharded over torchrun ranks)."""
    dataset = getattr(data, split)
    if dataset is None or len(dataset) == 0:  # type: ignore[arg-type]
        return None
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=data.collate)
    context, _ = _autocast(amp, device)
    with context:
        stats = data.objective.example_stats(model, (to_device(b, device, channels_last) for b in loader))
        if stats is None:
            return data.objective.metrics(model, (to_device(b, device, channels_last) for b in loader)), None
    return data.objective.metrics_from_stats(stats.sum(0)), stats


def recalibration_loader(dataset: Dataset, batch_size: int, max_batches: int | None, seed: int,
                         num_workers: int = 0, collate: Callable[[list[Any]], Any] | None = None) -> DataLoader:
    """The batches BatchNorm statistics are recalibrated on: a seeded random sample of the whole
    split (all of it when ``max_batches`` batches cover it), in random order.

    Real training lists are grouped by class (DomainNet list files, ImageFolder walks), so the
    first ``max_batches`` batches in file order would see only the first classes, and a batch of
    one class has the within-class variance only. Under torchrun each rank takes its share of
    the sample (the statistics are averaged over ranks afterwards)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))  # type: ignore[arg-type]
    if max_batches is not None:
        order = order[:max_batches * batch_size]
    info = dist.current()
    if info.enabled:
        order = order[info.rank::info.world_size]
    return DataLoader(Subset(dataset, order.tolist()), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, collate_fn=collate)


# ----------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": repr(random.getstate()),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(ast.literal_eval(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomically write ``payload``; the previous checkpoint is kept as ``<name>.prev``."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    if path.exists():
        path.replace(path.with_name(path.name + ".prev"))
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint at ``path`` (or its ``.prev``), loaded without running
    pickled code (``weights_only=True``). A damaged file is reported and the previous one used;
    if checkpoints exist but none is readable, training refuses to start over them."""
    candidates = [c for c in (path, path.with_name(path.name + ".prev")) if c.exists()]
    problems = []
    for candidate in candidates:
        try:
            state = torch.load(candidate, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated, corrupt, or carrying code
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            problems.append(f"{candidate}: {reason}")
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", candidate, reason)
            continue
        if not isinstance(state, dict) or "model" not in state or "step" not in state:
            problems.append(f"{candidate}: not an ftn training checkpoint")
            continue
        if candidate != path:
            log.warning("resuming from the previous checkpoint %s", candidate)
        return state
    if problems:
        raise FTNError("no usable checkpoint: " + "; ".join(problems) +
                       ". Move the file(s) away or set train.resume=false to start from scratch.")
    return None


def _compiled(fn: Callable[..., Any], mode: str) -> Callable[..., Any]:
    """``train.compile``: ``fn`` compiled. The step's loss (forward, and through AOTAutograd its
    backward) becomes one graph pair, the optimizer's step one more graph (its rates are tensors,
    see ``_optimizers``, so the schedule does not recompile it)."""
    if mode == "off":
        return fn
    if mode == "aot_eager":
        return torch.compile(fn, backend="aot_eager")
    return torch.compile(fn, mode=mode)


def _matching_rates(optimizer: torch.optim.Optimizer, compiled: bool) -> None:
    """After a resume: a checkpoint written without ``train.compile`` holds float rates (and
    AdamW's step counters on the CPU), one written with it tensor rates (and counters beside the
    parameters, ``capturable``); the optimizer keeps the kind its step was built for."""
    for g in optimizer.param_groups:
        if "capturable" in g and g["capturable"] != compiled:
            g["capturable"] = compiled
            for p in g["params"]:
                if "step" in (state := optimizer.state.get(p, {})):
                    state["step"] = state["step"].to(p.device if compiled else "cpu")
        if compiled and not isinstance(g["lr"], Tensor):
            g["lr"] = _rate_tensor(g["lr"], g["params"])
        elif not compiled and isinstance(g["lr"], Tensor):
            g["lr"] = float(g["lr"])
        if isinstance(g.get("initial_lr"), Tensor):
            g["initial_lr"] = float(g["initial_lr"])


# ----------------------------------------------------------------------------- training
def train_task(model: TrainableTask, data: TaskData, train_cfg: TrainConfig, data_cfg: DataConfig, out_dir: Path,
               seed: int = 0, device: torch.device | None = None, progress: bool = True,
               stop_after_steps: int | None = None, sync: bool = True) -> TaskResult:
    """Train one task; see the module docstring. ``sync=False`` trains this task on this rank
    alone (task-parallel torchrun). ``stop_after_steps`` aborts (as a crash would) after that
    many steps, for tests of resuming."""
    device = device or resolve_device(train_cfg.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "checkpoint.pt"
    seed_everything(seed)
    objective = data.objective

    # --- data order, schedule, optimizer
    n_train = len(data.train)  # type: ignore[arg-type]
    if n_train < data.min_batch:
        raise FTNError(f"task {data.name!r} has {n_train} training samples; it needs at least {data.min_batch}")
    info = dist.current() if sync else dist.DistInfo()
    main = dist.current().is_main or not sync
    if info.enabled and data_cfg.batch_size % info.world_size:
        raise FTNError(f"data.batch_size={data_cfg.batch_size} (the global batch) must be divisible by "
                       f"the number of processes ({info.world_size})")
    sampler = EpochBatchSampler(n_train, data_cfg.batch_size, seed, info.rank, info.world_size, data.min_batch)
    steps_per_epoch = len(sampler)
    total_steps = train_cfg.max_steps or train_cfg.epochs * steps_per_epoch
    lr_factor = _lr_factor(train_cfg, total_steps)
    if model.on_schedule is not None:  # e.g. TAPS: its penalty's warm-up and its scores' rate
        model.on_schedule(total_steps, lr_factor)
    optimizer, *own_optimizers = optimizers = _optimizers(model, train_cfg)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lr_factor) for o in optimizers]
    scheduler = schedulers[0]
    own_ids = _own_optimizer_params(model)
    clipped = [p for p in model.parameters if id(p) not in own_ids]
    autocast, scaler = _autocast(train_cfg.amp, device)
    step_loss = _compiled(lambda batch: objective.loss(model, batch), train_cfg.compile)
    # The main optimizer's step compiled with the loss (not under fp16's GradScaler, which steps
    # the optimizer itself after its inf check); TAPS's score optimizer stays eager.
    main_step = _compiled(optimizer.step, train_cfg.compile) if scaler is None else optimizer.step

    # --- resume
    step, epoch, skip, skipped = 0, 0, 0, 0
    best: dict[str, Any] = {"score": -math.inf, "epoch": -1, "state": None}
    history: list[dict[str, Any]] = []
    train_seconds = 0.0
    if train_cfg.resume and (ckpt := load_checkpoint(ckpt_path)) is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _matching_rates(optimizer, train_cfg.compile != "off")
        for o, state in zip(own_optimizers, ckpt.get("own_optimizers", [])):
            o.load_state_dict(state)
        for sch, state in zip(schedulers[1:], ckpt.get("own_schedulers", [])):
            sch.load_state_dict(state)
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step, epoch, skip = ckpt["step"], ckpt["epoch"], ckpt["skip"]
        best, history, skipped = ckpt["best"], ckpt["history"], ckpt.get("skipped", 0)
        train_seconds = ckpt.get("train_seconds", 0.0)
        _set_rng_state(ckpt["rng"])
        log.info("resumed %s at step %d (epoch %d)", data.name, step, epoch)

    def metrics_on(split: str) -> dict[str, float] | None:
        return evaluate(model, data, split, data_cfg.eval_batch_size, device, train_cfg.amp, data_cfg.num_workers,
                        train_cfg.channels_last)

    def checkpoint() -> None:
        if not main:
            return
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
            "own_optimizers": [o.state_dict() for o in own_optimizers],
            "own_schedulers": [sch.state_dict() for sch in schedulers[1:]],
            "step": step, "epoch": epoch, "skip": skip, "best": best, "history": history,
            "skipped": skipped, "train_seconds": train_seconds, "rng": _rng_state()})

    # train.on_nonfinite=stop: the losses are summed on the device (one op per step) and the sum's
    # finiteness is read where the loop reads anyway (log lines, checkpoints, epoch ends), so a
    # GPU step waits for nothing; a non-finite loss stops training at the next such read, before
    # any checkpoint or validation of the state it updated (a NaN/inf loss makes the sum NaN/inf).
    skip_nonfinite = train_cfg.on_nonfinite == "skip"
    loss_sum = torch.zeros((), device=device)
    checked_step = step  # the losses up to here were finite

    def check_finite() -> None:
        nonlocal checked_step
        if skip_nonfinite or checked_step == step:
            return
        total = loss_sum.reshape(1)
        finite = bool(dist.all_reduce_min(torch.isfinite(total).float()).item()) if info.enabled \
            else math.isfinite(total.item())
        if not finite:
            raise NonFiniteLossError(
                f"task {data.name!r}: the loss was nan or inf at a step in {checked_step + 1}..{step}; "
                f"training stopped, the last good checkpoint is {ckpt_path if ckpt_path.exists() else 'none yet'} "
                f"(set train.on_nonfinite=skip to skip such batches, or lower train.lr)")
        loss_sum.zero_()
        checked_step = step

    log_file = (out_dir / "log.csv").open("a", newline="") if main else io.StringIO()
    writer = csv.writer(log_file)
    if log_file.tell() == 0:
        writer.writerow(["step", "epoch", "loss", "lr", "seconds"])
    bar = tqdm(total=total_steps, initial=step, desc=data.name, disable=not (progress and main), leave=False,
               dynamic_ncols=True)

    # --- the loop
    try:
        while step < total_steps:
            sampler.set_epoch(epoch, skip)
            loader = DataLoader(data.train, batch_sampler=sampler, num_workers=data_cfg.num_workers,
                                collate_fn=data.collate)
            model.train()
            started = time.perf_counter()
            for batch in loader:
                objective.check(batch, "train")  # on the host: no device sync
                batch = to_device(batch, device, train_cfg.channels_last)
                if data.augment is not None:
                    batch = data.augment(batch)
                with autocast:
                    loss = step_loss(batch)
                # Every rank must take the same branch, so batch size (and, skipping bad batches,
                # finiteness) are agreed on.
                local_n = _batch_len(batch)
                global_n = int(dist.all_reduce_sum(torch.tensor([local_n], device=device)).item()) \
                    if info.enabled else local_n
                for o in optimizers:
                    o.zero_grad(set_to_none=True)
                if skip_nonfinite:  # deciding per batch needs the loss's finiteness now: one read per step
                    finite = bool(dist.all_reduce_min(torch.isfinite(loss.detach()).float().reshape(1)).item()) \
                        if info.enabled else bool(torch.isfinite(loss))
                else:  # "stop": summed on the device, read back only where the loop reads anyway
                    finite = True
                    loss_sum.add_(loss.detach().float())
                if not finite:
                    skipped += 1
                    log.warning("task %s: non-finite loss at step %d, batch skipped (%d so far)",
                                data.name, step + 1, skipped)
                else:
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        for o in optimizers:
                            scaler.unscale_(o)
                    else:
                        loss.backward()
                    if info.enabled:
                        dist.all_reduce_gradients(model.parameters, local_n, global_n)
                    if train_cfg.grad_clip:  # not the groups with optimizers of their own (TAPS's scores)
                        torch.nn.utils.clip_grad_norm_(clipped, train_cfg.grad_clip)
                    if scaler is not None:
                        for o in optimizers:
                            scaler.step(o)
                    else:
                        main_step()
                        for o in own_optimizers:
                            o.step()
                    if scaler is not None:
                        scaler.update()
                for sch in schedulers:
                    sch.step()
                step += 1
                skip += global_n
                bar.update(1)
                if step % train_cfg.log_every == 0 or step == total_steps:
                    check_finite()
                    value = loss.item()  # one read for the log and the bar
                    writer.writerow([step, epoch, f"{value:.6f}", f"{float(scheduler.get_last_lr()[0]):.3e}",
                                     f"{train_seconds + time.perf_counter() - started:.2f}"])
                    log_file.flush()  # a crash must not lose the log
                    bar.set_postfix(loss=f"{value:.3f}")
                if train_cfg.checkpoint_every and step % train_cfg.checkpoint_every == 0 and step < total_steps:
                    check_finite()  # never checkpoint a state a non-finite loss has updated
                    train_seconds += time.perf_counter() - started
                    started = time.perf_counter()
                    checkpoint()
                if stop_after_steps is not None and step >= stop_after_steps:
                    raise KeyboardInterrupt(f"stopped after {step} steps (as requested)")
                if step >= total_steps:
                    break
            train_seconds += time.perf_counter() - started
            check_finite()
            if info.enabled:
                dist.average_tensors(b for bn in model.batchnorms() for b in bn.buffers())
            # --- model selection: the epoch with the best validation score (without a
            # validation split: the last epoch, and no snapshot is needed)
            val = metrics_on("val")
            history.append({"epoch": epoch, "step": step, "val": val, "train_seconds": round(train_seconds, 3)})
            if val is None:
                best = {"score": float(epoch), "epoch": epoch, "state": None}
            elif (score := objective.score(val)) > best["score"]:
                best = {"score": score, "epoch": epoch, "state": model.state_dict()}
            epoch, skip = epoch + 1, 0
            checkpoint()
    finally:
        bar.close()
        log_file.close()

    # --- the kept state, its BatchNorm statistics, final metrics
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    if train_cfg.recalibrate_bn and model.batchnorms():
        model.eval()
        loader = recalibration_loader(data.recal if data.recal is not None else data.train, data_cfg.batch_size,
                                      train_cfg.recalibrate_batches, seed, data_cfg.num_workers, data.collate)
        layout = train_cfg.channels_last
        recalibrate_batchnorm(lambda batch: model(*objective.inputs(to_device(batch, device, layout))),
                              model.batchnorms(), loader, input_fn=lambda batch: batch)
        if info.enabled:
            dist.average_tensors(b for bn in model.batchnorms() for b in bn.buffers())
    val = metrics_on("val")
    result = TaskResult(task=data.name, val=val, test=metrics_on("test") if train_cfg.evaluate_test else None,
                        best_epoch=best["epoch"], steps=step, train_seconds=round(train_seconds, 3),
                        trainable_params=model.num_trainable(), history=history, skipped_batches=skipped,
                        val_score=None if val is None else float(objective.score(val)))
    if main:
        atomic_write_bytes(out_dir / "result.json", json.dumps(asdict(result), indent=2).encode())
    return result
