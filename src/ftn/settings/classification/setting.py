"""The classification setting: image domains (the embedded benchmark, DomainNet, ImageFolder
layouts), a torchvision backbone and a Linear head per domain, cross-entropy and top-1 accuracy."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision.transforms import v2

from ...core.errors import ConfigError
from ...training.config import DataConfig, ExperimentConfig
from ...training.setting import Classify, Setting, TaskData, mean_accuracy

__all__ = ["ImageDataConfig", "ClassificationSetting", "build_domain_data", "IMAGENET_NORMALIZE"]

IMAGENET_NORMALIZE = v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_CROP_RATIO = 1.14  # evaluation: shorter side to size * 1.14, then a centre crop


@dataclass
class ImageDataConfig(DataConfig):
    kind: str = "embedded"  # embedded | domainnet | imagefolder
    root: str | None = None  # dataset root for domainnet / imagefolder
    domains: list[str] = field(default_factory=lambda: ["mnist", "fashion", "animal", "optdigits"])
    image_size: int = 64
    val_fraction: float = 0.1  # domainnet has no val list: held out from train
    augment: bool = False
    skip_corrupt: bool = False


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


def build_domain_data(cfg: ImageDataConfig, domain: str, seed: int = 0) -> TaskData:
    """The train/val/test datasets of one domain as configured."""
    if cfg.kind == "embedded":
        from .multidomain import DOMAINS, MultiDomainDataset, random_affine_batch

        if domain not in DOMAINS:
            raise ConfigError(f"unknown embedded domain {domain!r}; choose from {list(DOMAINS)}")
        splits = {}
        for split in ("train", "val", "test"):
            ds = MultiDomainDataset(domain, split, image_size=cfg.image_size)
            splits[split] = TensorDataset(*ds.as_tensors())
            num_classes = ds.num_classes
        augment = (lambda batch: (random_affine_batch(batch[0]), batch[1])) if cfg.augment else None
        classes = ds.classes
        # The dataset stretches grayscale images to image_size and repeats them to 3 channels.
        input_spec = {"size": cfg.image_size, "channels": 1, "resize": "stretch"}
    elif cfg.kind == "domainnet":
        from .folders import DomainNetDataset

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
        from .folders import ImageFolderDomains

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
    return TaskData(domain, splits["train"], splits.get("val"), splits.get("test"), Classify(num_classes, domain),
                    recal=recal, augment=augment, info=info)


class ClassificationSetting(Setting):
    """Each domain of ``data.domains`` is a task: a Linear head on the backbone's features."""

    name = "classification"
    data_config = ImageDataConfig

    @classmethod
    def validate(cls, cfg: ExperimentConfig) -> None:
        d = cfg.data
        if d.kind not in ("embedded", "domainnet", "imagefolder"):
            raise ConfigError(f"data.kind must be embedded, domainnet or imagefolder, got {d.kind!r}")
        if d.kind != "embedded" and not d.root:
            raise ConfigError(f"data.root is required for data.kind={d.kind!r}")
        if not d.domains:
            raise ConfigError("data.domains is empty")
        if d.image_size < 1:
            raise ConfigError("data.image_size must be >= 1")

    def tasks(self) -> list[str]:
        return list(self.cfg.data.domains)

    def backbone(self) -> nn.Module:
        from ...training.backbones import MeanPooler, build_backbone

        m = self.cfg.model
        backbone, self.feature_dim = build_backbone(m.backbone, pretrained=m.pretrained, weights_path=m.weights_path)
        if isinstance(backbone, MeanPooler):
            raise ConfigError(f"{m.backbone} is a text encoder; the classification setting needs an image model "
                              f"(the text setting takes text encoders: setting: text)")
        return backbone

    def data(self, task: str) -> TaskData:
        return build_domain_data(self.cfg.data, task, seed=self.cfg.seed)

    def head(self, data: TaskData) -> nn.Module:
        return nn.Linear(self.feature_dim, data.objective.num_classes)

    def summarize(self, results: dict[str, Any]) -> dict[str, Any]:
        return mean_accuracy(results)
