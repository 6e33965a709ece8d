"""Dense multi-task training: FTN and its baselines on NYUD-layout data, in one harness.

Methods (``method.name``), all with one DeepLabv3+ decoder per task on the same encoder:

- ``single``: single-task full fine-tuning, one encoder + decoder copy per task;
- ``mtl``: one trainable encoder shared by four decoders, trained jointly on
  ``Σ_t w_t L_t`` (``train.loss_weights``);
- ``ftn``: the encoder frozen, each task trained separately with its own ΔW (rank per task), its
  own encoder norms and its own decoder; tasks are independent;
- ``all``: the three above, and the multi-task gain Δm of ``mtl`` and ``ftn`` against ``single``.

Conventions shared with the classification engine (:mod:`ftn.training.engine`): seeded
(:func:`~ftn.training.engine.seed_everything`, the same epoch-seeded batch order
:class:`~ftn.training.engine.EpochBatchSampler` for every method), SGD or AdamW with two parameter
groups (encoder-side at ``lr``, decoder at ``head_lr``), linear warm-up then poly (RCM) or cosine
decay, optional gradient clipping, and BatchNorm statistics recalibrated with the final weights at
the end (FTN: ``FTNModel.recalibrate_norms``; baselines: the same routine on their encoder BNs),
over the *un-augmented* training images. Evaluation runs once, after training, on the validation
split with the dataset-level meters of :mod:`ftn.dense.metrics`.

Each task uses the same loss weight ``w_t`` in every method (so the only difference between
single-task, multi-task and FTN training is what is shared); the defaults are
Multi-Task-Learning-PyTorch's NYUD weights (semseg 1, depth 1, normals 10, edge 50).

Configuration: :class:`DenseExperimentConfig` (YAML + ``section.key=value`` overrides with the
same close-key suggestions as :mod:`ftn.training.config`); :func:`train_dense_from_config` runs
``configs/nyud_resnet18_r30.yaml`` (the paper's setup).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..adapters import atomic_write_bytes
from ..errors import ConfigError, FTNError
from ..model import FTNModel
from ..norms import recalibrate_batchnorm
from ..training.config import _suggest, apply_overrides, load_config
from ..training.engine import (EpochBatchSampler, NonFiniteLossError, recalibration_loader, resolve_device,
                               seed_everything)
from .metrics import (
    DepthMeter,
    EdgeMeter,
    NormalsMeter,
    SegmentationMeter,
    depth_loss,
    edge_loss,
    multi_task_gain,
    normals_loss,
    semseg_loss,
)
from .model import (
    DenseEncoder,
    MultiTaskNet,
    SingleTaskNet,
    build_dense_ftn,
    build_encoder,
    build_head,
    count_parameters,
)
from .nyud import (IMAGENET_MEAN, IMAGENET_STD, TASKS, JointCompose, NYUDMultiTask, RandomCrop, RandomHorizontalFlip,
                   RandomScale, Resize)

__all__ = [
    "DenseDataConfig",
    "DenseModelConfig",
    "DenseMethodConfig",
    "DenseTrainConfig",
    "DenseEvalConfig",
    "DenseExperimentConfig",
    "DENSE_METHODS",
    "MAIN_METRICS",
    "load_dense_config",
    "apply_dense_overrides",
    "build_datasets",
    "task_loss",
    "evaluate_dense",
    "train_single_task",
    "train_multi_task",
    "train_ftn_task",
    "run_method",
    "run_dense",
    "DenseData",
    "build_ftn",
    "make_encoder",
    "make_head",
    "stored_parameters",
    "save_results",
    "train_dense_from_config",
]

log = logging.getLogger("ftn.dense")

DENSE_METHODS = ("single", "mtl", "ftn")
#: One headline metric per task, as in the usual NYUD table; Δm averages over these.
MAIN_METRICS: dict[str, str] = {"semseg": "mIoU", "depth": "rmse", "normals": "mean_angle", "edge": "odsF"}
#: Metrics kept per task in results (curves and per-class lists are dropped).
REPORTED: dict[str, tuple[str, ...]] = {
    "semseg": ("mIoU", "pixel_acc"),
    "depth": ("rmse", "abs_rel"),
    "normals": ("mean_angle", "median_angle", "within_11.25", "within_22.5", "within_30"),
    "edge": ("odsF", "oisF", "ods_threshold"),
}


# ----------------------------------------------------------------------------- configuration
@dataclass
class DenseDataConfig:
    root: str | None = None  # NYUD-layout folder (real NYUD-v2 or write_nyud_layout output)
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    num_classes: int | None = None  # None: from classes.json, else 40 (NYUD-v2)
    train_split: str = "train"
    val_split: str = "val"
    train_limit: int | None = None
    val_limit: int | None = None
    crop: list[int] = field(default_factory=lambda: [425, 560])  # (height, width) training crop
    scale_min: float = 0.5  # random scale range before cropping
    scale_max: float = 2.0
    flip: bool = True
    eval_size: list[int] | None = None  # None: evaluate at the images' own size
    batch_size: int = 8
    eval_batch_size: int = 8
    num_workers: int = 0


@dataclass
class DenseModelConfig:
    backbone: str = "resnet18"  # resnet18 | resnet34 | resnet50 | mobilenet_v2
    pretrained: bool = True
    weights_path: str | None = None
    output_stride: int = 16
    aspp_channels: int = 256
    low_channels: int = 48
    decoder_channels: int = 256


@dataclass
class DenseMethodConfig:
    name: str = "ftn"  # ftn | single | mtl | all
    rank: int = 30  # FTN rank per task
    ranks: dict[str, int] = field(default_factory=dict)  # per-task override, e.g. {edge: 16}


@dataclass
class DenseTrainConfig:
    epochs: int = 100
    max_steps: int | None = None  # per task (ftn, single) or in all (mtl); overrides epochs
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.005  # encoder side: FTN factors and norms, or the fine-tuned encoder
    head_lr: float | None = None  # decoders; None: lr
    lr_by_method: dict[str, float] = field(default_factory=dict)  # e.g. {single: 5e-4}: replaces lr
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "poly"  # poly | cosine
    poly_power: float = 0.9
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine only
    grad_clip: float | None = None
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {"semseg": 1.0, "depth": 1.0, "normals": 10.0, "edge": 50.0})
    edge_pos_weight: float = 0.95
    normals_loss: str = "l1"  # l1 | cosine
    recalibrate_bn: bool = True
    recalibrate_batches: int = 50
    device: str = "auto"
    log_every: int = 20
    save_adapters: bool = True  # FTN: write <output_dir>/ftn/<task>.safetensors


@dataclass
class DenseEvalConfig:
    edge_thresholds: int = 99
    edge_max_dist: float = 0.011  # NYUD tolerance, fraction of the image diagonal (HED/RCF/multi-task papers)
    edge_tolerance_px: float | None = None  # absolute tolerance in pixels; overrides max_dist
    edge_nms: bool = True  # edge non-maximum suppression before thinning (HED/RCF evaluation)


@dataclass
class DenseExperimentConfig:
    name: str = "nyud"
    output_dir: str = "runs/nyud"
    seed: int = 0
    data: DenseDataConfig = field(default_factory=DenseDataConfig)
    model: DenseModelConfig = field(default_factory=DenseModelConfig)
    method: DenseMethodConfig = field(default_factory=DenseMethodConfig)
    train: DenseTrainConfig = field(default_factory=DenseTrainConfig)
    eval: DenseEvalConfig = field(default_factory=DenseEvalConfig)

    def validate(self) -> DenseExperimentConfig:
        def choice(key: str, value: str, options: Sequence[str]) -> None:
            if value not in options:
                raise ConfigError(f"{key} must be one of {list(options)}, got {value!r}" + _suggest(value, options))

        choice("method.name", self.method.name, (*DENSE_METHODS, "all"))
        choice("train.optimizer", self.train.optimizer, ("sgd", "adamw"))
        choice("train.schedule", self.train.schedule, ("poly", "cosine"))
        choice("train.normals_loss", self.train.normals_loss, ("l1", "cosine"))
        if not self.data.tasks:
            raise ConfigError("data.tasks is empty")
        for t in self.data.tasks:
            choice("data.tasks", t, TASKS)
        for t in (*self.method.ranks, *self.train.loss_weights):
            choice("task name", t, TASKS)
        for m in self.train.lr_by_method:
            choice("train.lr_by_method key", m, DENSE_METHODS)
        if self.method.rank < 1 or any(r < 1 for r in self.method.ranks.values()):
            raise ConfigError("FTN ranks must be >= 1")
        if len(self.data.crop) != 2 or min(self.data.crop) < 8:
            raise ConfigError(f"data.crop must be [height, width] >= 8, got {self.data.crop}")
        if not 0 < self.data.scale_min <= self.data.scale_max:
            raise ConfigError("need 0 < data.scale_min <= data.scale_max")
        if self.data.batch_size < 2:
            raise ConfigError("data.batch_size must be >= 2 (ASPP's image-pooling BatchNorm needs 2 images)")
        if self.model.output_stride not in (8, 16, 32):
            raise ConfigError(f"model.output_stride must be 8, 16 or 32, got {self.model.output_stride}")
        return self

    def rank_of(self, task: str) -> int:
        return self.method.ranks.get(task, self.method.rank)

    def loss_weight(self, task: str) -> float:
        return float(self.train.loss_weights.get(task, 1.0))


def apply_dense_overrides(cfg: DenseExperimentConfig, overrides: Iterable[str]) -> DenseExperimentConfig:
    """Apply ``section.key=value`` strings (values parsed as YAML)."""
    return apply_overrides(cfg, overrides)


def load_dense_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> DenseExperimentConfig:
    """Defaults ← YAML file ← overrides; unknown keys fail with the closest valid key."""
    return load_config(path, overrides, cls=DenseExperimentConfig)


# ----------------------------------------------------------------------------- data
@dataclass
class DenseData:
    train: Dataset
    val: Dataset
    recal: Dataset  # the training images without augmentation
    num_classes: int
    tasks: tuple[str, ...]


def _limit(ds: Dataset, n: int | None) -> Dataset:
    return ds if n is None or n >= len(ds) else Subset(ds, range(n))  # type: ignore[arg-type]


def build_datasets(cfg: DenseExperimentConfig) -> DenseData:
    d = cfg.data
    if not d.root:
        raise ConfigError("data.root is required (a NYUD-layout folder)")
    aug: list[Any] = []
    if (d.scale_min, d.scale_max) != (1.0, 1.0):
        aug.append(RandomScale((d.scale_min, d.scale_max)))
    aug.append(RandomCrop(tuple(d.crop)))
    if d.flip:
        aug.append(RandomHorizontalFlip())
    plain = Resize(tuple(d.eval_size)) if d.eval_size else None
    tasks = tuple(d.tasks)
    train = NYUDMultiTask(d.root, d.train_split, tasks, transform=JointCompose(aug))
    val = NYUDMultiTask(d.root, d.val_split, tasks, transform=plain)
    recal = NYUDMultiTask(d.root, d.train_split, tasks, transform=plain)
    num_classes = d.num_classes or (len(train.class_names) if train.class_names else 40)
    return DenseData(_limit(train, d.train_limit), _limit(val, d.val_limit), _limit(recal, d.train_limit),
                     num_classes, tasks)


# ----------------------------------------------------------------------------- losses, metrics
def task_loss(task: str, pred: Tensor, batch: Mapping[str, Tensor], cfg: DenseExperimentConfig) -> Tensor:
    """The task's unweighted loss (CE, masked L1, normals L1/cosine, balanced BCE)."""
    target = batch[task]
    if task == "semseg":
        return semseg_loss(pred, target)
    if task == "depth":
        return depth_loss(pred, target)
    if task == "normals":
        return normals_loss(pred, target, kind=cfg.train.normals_loss)
    return edge_loss(pred, target, pos_weight=cfg.train.edge_pos_weight)


def _meters(tasks: Sequence[str], num_classes: int, ecfg: DenseEvalConfig) -> dict[str, Any]:
    make = {
        "semseg": lambda: SegmentationMeter(num_classes),
        "depth": DepthMeter,
        "normals": NormalsMeter,
        "edge": lambda: EdgeMeter(ecfg.edge_thresholds, ecfg.edge_max_dist, ecfg.edge_tolerance_px,
                                  nms=ecfg.edge_nms),
    }
    return {t: make[t]() for t in tasks}


@torch.no_grad()
def evaluate_dense(predict: Callable[[Tensor], Mapping[str, Tensor]], dataset: Dataset, tasks: Sequence[str],
                   num_classes: int, cfg: DenseExperimentConfig, device: torch.device | None = None,
                   ) -> dict[str, dict[str, float]]:
    """Dataset-level metrics of ``predict(images) -> {task: output}`` (outputs as the heads give
    them: logits for semseg and edge); keeps the metrics in ``REPORTED`` for each task."""
    device = device or torch.device("cpu")
    meters = _meters(tasks, num_classes, cfg.eval)
    loader = DataLoader(dataset, batch_size=cfg.data.eval_batch_size, shuffle=False,
                        num_workers=cfg.data.num_workers)
    for batch in loader:
        out = predict(batch["image"].to(device))
        for t in tasks:
            pred = out[t].float()
            if t == "edge":
                pred = torch.sigmoid(pred)
            meters[t].update(pred.cpu(), batch[t])
    result = {}
    for t in tasks:
        values = meters[t].compute()
        result[t] = {k: float(values[k]) for k in REPORTED[t]}
    return result


# ----------------------------------------------------------------------------- the loop
def _lr_factor(cfg: DenseTrainConfig, total: int) -> Callable[[int], float]:
    warm = cfg.warmup_steps

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if cfg.schedule == "poly":
            return (1.0 - progress) ** cfg.poly_power
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def _optimizer(cfg: DenseTrainConfig, body: list[nn.Parameter], head: list[nn.Parameter]) -> torch.optim.Optimizer:
    groups = [g for g in ({"params": body, "lr": cfg.lr}, {"params": head, "lr": cfg.head_lr or cfg.lr})
              if g["params"]]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _fit(name: str, module: nn.Module, loss_fn: Callable[[dict[str, Any]], Tensor], body: list[nn.Parameter],
         head: list[nn.Parameter], data: DenseData, cfg: DenseExperimentConfig, device: torch.device,
         progress: bool) -> dict[str, Any]:
    """Train ``module`` on ``loss_fn(batch)``: the engine's conventions (seeded order, warm-up +
    poly/cosine, clipping, non-finite loss stops). Returns the loss history and timings."""
    tcfg = cfg.train
    n = len(data.train)  # type: ignore[arg-type]
    if n < 2:
        raise FTNError("dense training needs at least 2 training images")
    bs = min(cfg.data.batch_size, n)
    sampler = EpochBatchSampler(n, bs, cfg.seed)
    per_epoch = len(sampler) - (1 if n % bs == 1 else 0)  # a 1-image batch is skipped (ASPP BN)
    total = tcfg.max_steps or tcfg.epochs * per_epoch
    params = body + head
    optimizer = _optimizer(tcfg, body, head)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(tcfg, total))
    seed_everything(cfg.seed)
    module.train()
    history: list[dict[str, float]] = []
    step, epoch, running, count = 0, 0, 0.0, 0
    started = time.perf_counter()
    bar = tqdm(total=total, desc=name, disable=not progress, leave=False, dynamic_ncols=True)
    try:
        while step < total:
            sampler.set_epoch(epoch)
            loader = DataLoader(data.train, batch_sampler=sampler, num_workers=cfg.data.num_workers)
            for batch in loader:
                if batch["image"].shape[0] < 2:
                    continue
                batch = {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in batch.items()}
                loss = loss_fn(batch)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(f"{name}: loss is {loss.item()} at step {step + 1}; lower train.lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if tcfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                running += float(loss.detach())
                count += 1
                bar.update(1)
                if step % tcfg.log_every == 0 or step == total:
                    history.append({"step": step, "epoch": epoch, "loss": running / count,
                                    "lr": scheduler.get_last_lr()[0],
                                    "seconds": round(time.perf_counter() - started, 2)})
                    bar.set_postfix(loss=f"{running / count:.3f}")
                    running, count = 0.0, 0
                if step >= total:
                    break
            epoch += 1
    finally:
        bar.close()
    return {"steps": step, "epochs": epoch, "train_seconds": round(time.perf_counter() - started, 2),
            "history": history}


def _recal_loader(data: DenseData, cfg: DenseExperimentConfig) -> DataLoader:
    return recalibration_loader(data.recal, max(2, cfg.data.batch_size), cfg.train.recalibrate_batches, cfg.seed,
                                cfg.data.num_workers)


def _recalibrate(run: Callable[[Tensor], Any], bns: list[_BatchNorm], data: DenseData, cfg: DenseExperimentConfig,
                 device: torch.device) -> int:
    if not cfg.train.recalibrate_bn or not bns:
        return 0
    return recalibrate_batchnorm(run, bns, _recal_loader(data, cfg), input_fn=lambda b: b["image"].to(device))


def _head_kwargs(cfg: DenseExperimentConfig) -> dict[str, int]:
    m = cfg.model
    return {"aspp_channels": m.aspp_channels, "low_channels": m.low_channels, "decoder_channels": m.decoder_channels}


def make_encoder(cfg: DenseExperimentConfig) -> DenseEncoder:
    """The configured encoder; seeded, so a randomly initialised one is the same in every unit
    (in this process or in a worker)."""
    m = cfg.model
    torch.manual_seed(cfg.seed)
    return build_encoder(m.backbone, m.pretrained, m.output_stride, m.weights_path)


def make_head(cfg: DenseExperimentConfig, encoder: DenseEncoder, task: str, num_classes: int) -> nn.Module:
    """The task's decoder, initialised from ``seed + task index`` so every method starts a task
    from the same decoder."""
    torch.manual_seed(cfg.seed * 1000 + TASKS.index(task))
    return build_head(encoder, task, num_classes, **_head_kwargs(cfg))


# ----------------------------------------------------------------------------- methods
def train_single_task(cfg: DenseExperimentConfig, task: str, data: DenseData, encoder: DenseEncoder | None = None,
                      device: torch.device | None = None, progress: bool = True) -> tuple[SingleTaskNet, dict[str, Any]]:
    """Single-task full fine-tuning: a fresh encoder (or ``encoder``, used as is) + decoder."""
    device = device or resolve_device(cfg.train.device)
    encoder = encoder if encoder is not None else make_encoder(cfg)
    net = SingleTaskNet(encoder, make_head(cfg, encoder, task, data.num_classes)).to(device)
    net.requires_grad_(True)
    w = cfg.loss_weight(task)
    info = _fit(f"single/{task}", net, lambda b: w * task_loss(task, net(b["image"]), b, cfg),
                list(net.encoder.parameters()), list(net.head.parameters()), data, cfg, device, progress)
    net.eval()
    info["recalibrated_batches"] = _recalibrate(net.encoder, _bns(net.encoder), data, cfg, device)
    info["parameters"] = {"encoder": count_parameters(net.encoder), "decoder": count_parameters(net.head)}
    return net, info


def train_multi_task(cfg: DenseExperimentConfig, data: DenseData, encoder: DenseEncoder | None = None,
                     device: torch.device | None = None, progress: bool = True) -> tuple[MultiTaskNet, dict[str, Any]]:
    """One shared trainable encoder and a decoder per task, trained jointly on Σ_t w_t L_t."""
    device = device or resolve_device(cfg.train.device)
    encoder = encoder if encoder is not None else make_encoder(cfg)
    tasks = data.tasks
    net = MultiTaskNet(encoder, {t: make_head(cfg, encoder, t, data.num_classes) for t in tasks}).to(device)
    net.requires_grad_(True)

    def loss_fn(b: dict[str, Any]) -> Tensor:
        out = net(b["image"])
        return sum(cfg.loss_weight(t) * task_loss(t, out[t], b, cfg) for t in tasks)  # type: ignore[return-value]

    info = _fit("mtl", net, loss_fn, list(net.encoder.parameters()), list(net.heads.parameters()),
                data, cfg, device, progress)
    net.eval()
    info["recalibrated_batches"] = _recalibrate(net.encoder, _bns(net.encoder), data, cfg, device)
    info["parameters"] = {"encoder": count_parameters(net.encoder),
                          "decoders": {t: count_parameters(net.heads[t]) for t in tasks}}
    return net, info


def build_ftn(cfg: DenseExperimentConfig, tasks: Sequence[str], num_classes: int,
              encoder: DenseEncoder | None = None) -> FTNModel:
    """FTN model with ``tasks`` added (each decoder initialised as in the baselines)."""
    encoder = encoder if encoder is not None else make_encoder(cfg)
    model = build_dense_ftn(encoder, [], num_classes, rank=cfg.method.rank)
    for t in tasks:
        head = make_head(cfg, encoder, t, num_classes)
        model.add_task(t, head=head, rank=cfg.rank_of(t))
    return model


def train_ftn_task(model: FTNModel, task: str, cfg: DenseExperimentConfig, data: DenseData,
                   device: torch.device | None = None, progress: bool = True) -> dict[str, Any]:
    """Train one FTN task on the frozen encoder: only ``model.task_parameters(task)`` (its ΔW
    factors and norms at ``lr``, its decoder at ``head_lr``) are optimised; the task's BatchNorm
    statistics are then recalibrated. Other tasks are untouched."""
    device = device or resolve_device(cfg.train.device)
    model.to(device)
    named = model.named_task_parameters(task)
    body = [p for n, p in named if not n.startswith("head.")]
    head = [p for n, p in named if n.startswith("head.")]
    w = cfg.loss_weight(task)
    model.set_task(task)
    try:
        info = _fit(f"ftn/{task}", model, lambda b: w * task_loss(task, model(b["image"], task=task), b, cfg),
                    body, head, data, cfg, device, progress)
    finally:
        model.set_task(None)
    model.eval()
    if cfg.train.recalibrate_bn:
        info["recalibrated_batches"] = model.recalibrate_norms(
            task, _recal_loader(data, cfg), input_fn=lambda b: b["image"].to(device))
    rep = model.parameter_report()
    tp = rep.tasks[task]
    info["parameters"] = {"encoder": rep.backbone, "delta": tp.delta, "norms": tp.norms, "decoder": tp.head}
    return info


def dense_adapter_info(cfg: DenseExperimentConfig, task: str, data: DenseData) -> dict[str, Any]:
    """What a dense adapter file says about itself, so ``ftn predict`` can rebuild the encoder and
    decoder and write readable prediction images: output channels, encoder, decoder sizes."""
    names = getattr(getattr(data.train, "dataset", data.train), "class_names", None)
    if task == "semseg":
        labels = list(names) if names and len(names) == data.num_classes else [f"class {i}" for i in range(data.num_classes)]
    else:
        labels = {"depth": ["depth (m)"], "normals": ["normal x", "normal y", "normal z"],
                  "edge": ["edge logit"]}[task]
    return {"labels": labels,
            "input": {"channels": 3, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "resize": "none"},
            "outputs": {"kind": "dense", "task": task, "num_classes": data.num_classes, "head": _head_kwargs(cfg),
                        "encoder": {"backbone": cfg.model.backbone, "output_stride": cfg.model.output_stride}}}


def _bns(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


# ----------------------------------------------------------------------------- one method
def run_method(cfg: DenseExperimentConfig, method: str, task: str | None = None, progress: bool = True,
               preview: Sequence[int] = (), data: DenseData | None = None) -> dict[str, Any]:
    """Train and evaluate one method (``task`` restricts ``single``/``ftn`` to that task; ``mtl``
    always trains all tasks). Returns picklable results: ``metrics`` per task, ``parameters``,
    ``train`` info per task, and ``preview`` predictions on the given validation indices.

    This is the unit of work of :func:`run_dense` (and of its worker processes)."""
    device = resolve_device(cfg.train.device)
    data = data or build_datasets(cfg)
    tasks = data.tasks if task is None else (task,)
    if method in cfg.train.lr_by_method:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=cfg.train.lr_by_method[method]))
    out_dir = Path(cfg.output_dir)
    metrics: dict[str, dict[str, float]] = {}
    infos: dict[str, Any] = {}
    previews: dict[str, Tensor] = {}
    pv = [data.val[i]["image"] for i in preview] if preview else []  # type: ignore[index]
    pv_x = torch.stack(pv).to(device) if pv else None

    def store_preview(t: str, fn: Callable[[Tensor], Tensor]) -> None:
        if pv_x is not None:
            with torch.no_grad():
                previews[t] = fn(pv_x).float().cpu()

    if method == "single":
        for t in tasks:
            net, info = train_single_task(cfg, t, data, device=device, progress=progress)
            metrics.update(evaluate_dense(lambda x, net=net, t=t: {t: net(x)}, data.val, [t], data.num_classes,
                                          cfg, device))
            store_preview(t, net)
            infos[t] = info
            del net
    elif method == "mtl":
        net, info = train_multi_task(cfg, data, device=device, progress=progress)
        metrics = evaluate_dense(net, data.val, tasks, data.num_classes, cfg, device)
        for t in tasks:
            store_preview(t, lambda x, t=t: net(x, task=t))
        infos["all"] = info
    elif method == "ftn":
        model = build_ftn(cfg, tasks, data.num_classes)
        for t in tasks:
            infos[t] = train_ftn_task(model, t, cfg, data, device=device, progress=progress)
            metrics.update(evaluate_dense(lambda x, t=t: {t: model(x, task=t)}, data.val, [t], data.num_classes,
                                          cfg, device))
            store_preview(t, lambda x, t=t: model(x, task=t))
            if cfg.train.save_adapters:
                model.save_task(t, out_dir / "ftn" / f"{t}.safetensors", info=dense_adapter_info(cfg, t, data))
    else:
        raise ConfigError(f"unknown method {method!r}; known: {list(DENSE_METHODS)}" + _suggest(method, DENSE_METHODS))
    return {"method": method, "metrics": metrics, "train": infos, "preview": previews}


def stored_parameters(method: str, infos: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, int]:
    """Parameters stored to serve all ``tasks`` (BatchNorm running statistics not counted):
    single = Σ_t (encoder + decoder_t); mtl = encoder + Σ_t decoder_t;
    ftn = encoder + Σ_t (ΔW_t + norms_t + decoder_t)."""
    if method == "single":
        per = {t: infos[t]["parameters"]["encoder"] + infos[t]["parameters"]["decoder"] for t in tasks}
        return {"shared": 0, **{f"task:{t}": v for t, v in per.items()}, "total": sum(per.values())}
    if method == "mtl":
        p = infos["all"]["parameters"]
        total = p["encoder"] + sum(p["decoders"][t] for t in tasks)
        return {"shared": p["encoder"], **{f"task:{t}": p["decoders"][t] for t in tasks}, "total": total}
    enc = infos[tasks[0]]["parameters"]["encoder"]
    per = {t: infos[t]["parameters"]["delta"] + infos[t]["parameters"]["norms"] + infos[t]["parameters"]["decoder"]
           for t in tasks}
    return {"shared": enc, **{f"task:{t}": v for t, v in per.items()}, "total": enc + sum(per.values())}


# ----------------------------------------------------------------------------- all methods
def _job(args: tuple[DenseExperimentConfig, str, str | None, Sequence[int], int]) -> dict[str, Any]:
    cfg, method, task, preview, threads = args
    if threads:
        torch.set_num_threads(threads)
    return run_method(cfg, method, task, progress=False, preview=preview)


def run_dense(cfg: DenseExperimentConfig, methods: Sequence[str] | None = None, progress: bool = True,
              workers: int = 1, threads: int | None = None, preview: Sequence[int] = (),
              on_result: Callable[[str, str | None, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run ``methods`` (default: ``cfg.method.name``, all three for ``"all"``) and assemble the
    table: per method each task's metrics, Δm against ``single`` (when it ran), stored parameters.

    ``workers > 1`` runs the independent units (each single-task network, each FTN task, the
    multi-task network) in that many spawned processes, each with ``threads`` torch threads;
    the results are the same as with ``workers=1`` (each unit is seeded on its own).
    """
    cfg.validate()
    if methods is None:
        methods = DENSE_METHODS if cfg.method.name == "all" else (cfg.method.name,)
    started = time.perf_counter()
    data = build_datasets(cfg)
    tasks = data.tasks
    units = [(m, t) for m in methods for t in ((None,) if m == "mtl" else tasks)]
    # Longest first, so two workers finish together.
    units.sort(key=lambda u: u[0] != "mtl")
    parts: list[tuple[str, str | None, dict[str, Any]]] = []
    if workers > 1 and len(units) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_job, (cfg, m, t, tuple(preview), threads or 0)): (m, t) for m, t in units}
            bar = tqdm(total=len(units), desc="dense units", disable=not progress, leave=False)
            for fut in as_completed(futures):
                m, t = futures[fut]
                res = fut.result()
                parts.append((m, t, res))
                bar.update(1)
                if on_result:
                    on_result(m, t, res)
            bar.close()
    else:
        previous = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            for m, t in units:
                res = run_method(cfg, m, t, progress=progress, preview=preview, data=data)
                parts.append((m, t, res))
                if on_result:
                    on_result(m, t, res)
        finally:
            torch.set_num_threads(previous)
    results: dict[str, Any] = {"tasks": list(tasks), "num_classes": data.num_classes, "methods": {},
                               "main_metrics": {t: MAIN_METRICS[t] for t in tasks}}
    previews: dict[str, dict[str, Tensor]] = {}
    for m in methods:
        metrics: dict[str, Any] = {}
        infos: dict[str, Any] = {}
        for pm, _, res in parts:
            if pm == m:
                metrics.update(res["metrics"])
                infos.update(res["train"])
                previews.setdefault(m, {}).update(res["preview"])
        metrics = {t: metrics[t] for t in tasks}
        train_seconds = sum(i["train_seconds"] for i in infos.values())
        results["methods"][m] = {"metrics": metrics, "parameters": stored_parameters(m, infos, tasks),
                                 "train_seconds": round(train_seconds, 1),
                                 "steps": {k: i["steps"] for k, i in infos.items()},
                                 "history": {k: i["history"] for k, i in infos.items()}}
    if "single" in results["methods"]:
        base = results["methods"]["single"]["metrics"]
        flat_base = {MAIN_METRICS[t]: base[t][MAIN_METRICS[t]] for t in tasks}
        for m, r in results["methods"].items():
            flat = {MAIN_METRICS[t]: r["metrics"][t][MAIN_METRICS[t]] for t in tasks}
            r["delta_m"] = multi_task_gain(flat, flat_base)
            r["delta_per_task"] = {t: multi_task_gain(flat, flat_base, metrics=[MAIN_METRICS[t]]) for t in tasks}
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    results["config"] = dataclasses.asdict(cfg)
    results["_previews"] = previews  # tensors; dropped from results.json
    return results


def save_results(results: Mapping[str, Any], path: str | Path) -> Path:
    """``results.json`` without the prediction tensors."""
    clean = {k: v for k, v in results.items() if not k.startswith("_")}
    return atomic_write_bytes(path, json.dumps(clean, indent=2, default=float).encode())


def train_dense_from_config(path: str | Path | None, overrides: Iterable[str] = (), progress: bool = True,
                            workers: int = 1) -> dict[str, Any]:
    """Load a dense config (e.g. ``configs/nyud_resnet18_r30.yaml``), apply overrides, train the
    configured method(s), and write ``<output_dir>/results.json``."""
    cfg = load_dense_config(path, overrides)
    results = run_dense(cfg, progress=progress, workers=workers)
    save_results(results, Path(cfg.output_dir) / "results.json")
    return results
