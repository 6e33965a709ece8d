"""Run one experiment: build the data and the method, train the domains one after another,
save each domain's adapter (or state) and a results file."""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision.transforms import v2

from ..adapters import atomic_write_bytes
from ..backbones import build_backbone
from ..errors import ConfigError
from . import distributed
from .config import DataConfig, ExperimentConfig, config_to_dict
from .engine import DomainData, DomainResult, resolve_device, seed_everything, train_domain
from .methods import FTNMethod, Method, make_method

__all__ = ["build_domain_data", "run_experiment", "IMAGENET_NORMALIZE"]

log = logging.getLogger("ftn.train")
IMAGENET_NORMALIZE = v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_CROP_RATIO = 1.14  # evaluation: shorter side to size * 1.14, then a centre crop


def _limit(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    """A fixed random subset of ``limit`` samples (the same for every method and run)."""
    n = len(dataset)  # type: ignore[arg-type]
    if limit is None or limit >= n:
        return dataset
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(n, generator=g)[:limit].sort().values.tolist()
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(t[index] for t in dataset.tensors))
    return Subset(dataset, index)


def _with_transform(dataset: Dataset, transform: Any) -> Dataset:
    """The same samples as ``dataset`` (a folder dataset, possibly inside Subsets) read with
    ``transform`` instead of its own: the training split as evaluation sees it."""
    if isinstance(dataset, Subset):
        return Subset(_with_transform(dataset.dataset, transform), dataset.indices)
    twin = copy.copy(dataset)  # shares the sample list; only the transform differs
    twin.transform = transform  # type: ignore[attr-defined]
    return twin


def _image_transforms(size: int, augment: bool) -> dict[str, v2.Compose]:
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), IMAGENET_NORMALIZE]
    evaluation = v2.Compose([v2.Resize(int(size * _CROP_RATIO)), v2.CenterCrop(size), *to_tensor])
    training = v2.Compose([v2.RandomResizedCrop(size, scale=(0.35, 1.0)), v2.RandomHorizontalFlip(), *to_tensor]) \
        if augment else evaluation
    return {"train": training, "val": evaluation, "test": evaluation}


def build_domain_data(cfg: DataConfig, domain: str, seed: int = 0) -> DomainData:
    """The train/val/test datasets of one domain as configured."""
    if cfg.kind == "embedded":
        from ..data.multidomain import DOMAINS, MultiDomainDataset, random_affine_batch

        if domain not in DOMAINS:
            raise ConfigError(f"unknown embedded domain {domain!r}; choose from {list(DOMAINS)}")
        splits = {}
        for split in ("train", "val", "test"):
            ds = MultiDomainDataset(domain, split, image_size=cfg.image_size)
            splits[split] = TensorDataset(*ds.as_tensors())
            num_classes = ds.num_classes
        augment = (lambda x: random_affine_batch(x)) if cfg.augment else None
        classes = ds.classes
        # The dataset stretches grayscale images to image_size and repeats them to 3 channels.
        input_spec = {"size": cfg.image_size, "channels": 1, "resize": "stretch"}
    elif cfg.kind == "domainnet":
        from ..data.folders import DomainNetDataset

        tf = _image_transforms(cfg.image_size, cfg.augment)
        train_full = DomainNetDataset(cfg.root, domain, "train", transform=tf["train"], skip_corrupt=cfg.skip_corrupt)
        train_eval = DomainNetDataset(cfg.root, domain, "train", transform=tf["val"], skip_corrupt=cfg.skip_corrupt)
        test = DomainNetDataset(cfg.root, domain, "test", transform=tf["test"], skip_corrupt=cfg.skip_corrupt)
        # DomainNet has no validation list: hold out a fixed fraction of train for model selection.
        n = len(train_full)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = int(round(n * cfg.val_fraction)) if n > 1 else 0
        splits = {"train": Subset(train_full, sorted(perm[n_val:])), "val": Subset(train_eval, sorted(perm[:n_val])),
                  "test": test}
        num_classes = train_full.num_classes
        augment = None
        classes = train_full.classes
    else:
        from ..data.folders import ImageFolderDomains

        tf = _image_transforms(cfg.image_size, cfg.augment)
        folders = ImageFolderDomains(cfg.root, [domain], transform=tf, skip_corrupt=cfg.skip_corrupt)
        splits = dict(folders[domain])
        num_classes = folders.num_classes(domain)
        augment = None
        classes = folders.classes[domain]
    limits = {"train": cfg.train_limit, "val": cfg.val_limit, "test": cfg.test_limit}
    splits = {k: _limit(v, limits[k], seed) for k, v in splits.items()}
    # BatchNorm statistics are recalibrated on the training images without augmentation.
    recal = _with_transform(splits["train"], tf["val"]) if cfg.kind != "embedded" and cfg.augment else None
    if cfg.kind != "embedded":  # evaluation transform of _image_transforms
        input_spec = {"size": cfg.image_size, "channels": 3, "resize": "center_crop", "crop_ratio": _CROP_RATIO}
    input_spec.update(mean=list(IMAGENET_NORMALIZE.mean), std=list(IMAGENET_NORMALIZE.std))
    info = {"labels": [str(c) for c in classes], "input": input_spec}
    return DomainData(domain, splits["train"], splits.get("val"), splits.get("test"), num_classes, augment,
                      recal=recal, info=info)


def build_method(cfg: ExperimentConfig, device: torch.device) -> Method:
    backbone, dim = build_backbone(cfg.model.backbone, pretrained=cfg.model.pretrained,
                                   weights_path=cfg.model.weights_path)
    return make_method(cfg.method, backbone.to(device), dim, device)


def run_experiment(cfg: ExperimentConfig, progress: bool = True, method: Method | None = None,
                   stop_after_steps: int | None = None) -> dict[str, Any]:
    """Train every configured domain in turn; write ``results.json`` and per-domain files under
    ``output_dir`` (``<domain>/log.csv``, ``<domain>/result.json``, ``adapters/<domain>.safetensors``)."""
    info = distributed.init_distributed()
    by_domain = info.enabled and cfg.train.distributed == "domains"
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        atomic_write_bytes(out / "config.json", json.dumps(config_to_dict(cfg), indent=2).encode())
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    seed_everything(cfg.seed)
    method = method or build_method(cfg, device)
    loaded = []
    if cfg.method.load_adapters:
        if not isinstance(method, FTNMethod):
            raise ConfigError("method.load_adapters needs method.name=ftn (or bn_head)")
        loaded = [method.load_domain(p) for p in cfg.method.load_adapters]
    results: dict[str, DomainResult] = {}
    started = time.perf_counter()
    for i, domain in enumerate(cfg.data.domains):
        if by_domain and i % info.world_size != info.rank:
            continue  # domain-parallel: this domain belongs to another rank
        if domain in method.domains:
            raise ConfigError(f"domain {domain!r} is already in the model (loaded from an adapter)")
        data = build_domain_data(cfg.data, domain, seed=cfg.seed)
        seed_everything(cfg.seed + i)
        domain_model = method.add_domain(domain, data.num_classes)
        results[domain] = train_domain(domain_model, data, cfg.train, cfg.data, out / domain, seed=cfg.seed + i,
                                       device=device, progress=progress, stop_after_steps=stop_after_steps,
                                       sync=not by_domain)
        if info.is_main or by_domain:
            method.save_domain(domain, out / "adapters", info=data.info)
        log.info("%s/%s: test top-1 %.2f%%", method.name, domain, results[domain].test_acc or float("nan"))
    stored = method.stored_parameters()
    if by_domain:  # every rank trained some domains: gather them (shared backbone counted once)
        gathered = distributed.all_gather_object((results, stored - method.shared_parameters()))
        results = {d: r for part, _ in gathered for d, r in part.items()}
        results = {d: results[d] for d in cfg.data.domains if d in results}
        stored = method.shared_parameters() + sum(extra for _, extra in gathered)
    tests = [r.test_acc for r in results.values() if r.test_acc is not None]
    summary = {
        "method": method.name,
        "backbone": cfg.model.backbone,
        "domains": {d: asdict(r) for d, r in results.items()},
        "loaded_domains": loaded,
        "mean_test_acc": sum(tests) / len(tests) if tests else None,
        "trainable_per_domain": {d: r.trainable_params for d, r in results.items()},
        "stored_parameters": stored,
        "world_size": info.world_size,
        "train_seconds": round(sum(r.train_seconds for r in results.values()), 2),
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    if info.is_main:
        atomic_write_bytes(out / "results.json", json.dumps(summary, indent=2).encode())
    distributed.barrier()
    return summary

