"""The embedded multi-domain benchmark: four small real image domains, ten classes each.

The data ships inside the package as ``ftn/data/assets/multidomain_v1.npz`` (about 3.6 MB), built
by ``tools/build_multidomain.py`` from MNIST (5k subset), Fashion-MNIST, Animal-MNIST and UCI
optdigits; see ``docs/data-card-multidomain.md`` for sources, licences and counts. Every domain has
its own label space (``0..9``) and fixed, stratified ``train``/``val``/``test`` splits.

Images are stored as uint8 28x28 grayscale and turned, at load time, into 3-channel float tensors
at any resolution, normalised with the ImageNet mean/std so that ImageNet-pretrained backbones
can consume them. Two ways to get them:

* :class:`MultiDomainDataset` — a map-style ``torch.utils.data.Dataset`` that transforms one image
  at a time through torchvision transforms, optionally with light augmentation;
* :meth:`MultiDomainDataset.as_tensors` — the whole split resized in one batched
  ``interpolate`` call, so CPU-only training can slice mini-batches from one tensor instead of
  running a DataLoader; pair it with :func:`random_affine_batch` for batched augmentation.

This module needs only numpy, torch and torchvision at run time.
"""

from __future__ import annotations

import functools
import json
import math
import zipfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ...core.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_PATH",
    "DOMAINS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SPLITS",
    "MultiDomainDataset",
    "domain_datasets",
    "load_multidomain",
    "random_affine_batch",
]

DOMAINS: tuple[str, ...] = ("mnist", "fashion", "animal", "optdigits")
SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

DEFAULT_PATH: Path = Path(__file__).resolve().parent / "assets" / "multidomain_v1.npz"

_FORMAT_NAME = "ftn-multidomain"
_FORMAT_VERSION = 1
_REBUILD_HINT = "rebuild it with `python tools/build_multidomain.py` from a source checkout"


# --------------------------------------------------------------------------------------------
# reading the file


def load_multidomain(path: str | Path | None = None) -> dict[str, Any]:
    """Read and validate the multi-domain ``.npz``.

    Args:
        path: the file to read; ``None`` reads the copy packaged with ftn.

    Returns:
        ``{"path": Path, "meta": dict, "domains": {name: {"classes": list[str], "splits":
        {split: {"images": uint8 [N, 28, 28], "labels": int64 [N]}}}}}`` with domains in the
        file's order. The arrays are read-only and shared between calls (the file is parsed once
        per path and modification time), so copy them before changing them.

    Raises:
        DataError: the file is missing, is not a valid archive, or its content is inconsistent.
    """
    resolved = Path(path).expanduser().resolve() if path is not None else DEFAULT_PATH
    try:
        stat = resolved.stat()
    except FileNotFoundError:
        raise DataError(f"multi-domain data file not found: {resolved} ({_REBUILD_HINT})") from None
    except OSError as exc:
        raise DataError(f"cannot read multi-domain data file {resolved}: {exc}") from exc
    if not resolved.is_file():
        raise DataError(f"multi-domain data path is not a file: {resolved}")
    meta, domains = _load_cached(str(resolved), stat.st_mtime_ns, stat.st_size)
    # Fresh containers around the shared read-only arrays, so a caller editing the dicts cannot
    # corrupt what the next caller gets from the cache.
    return {
        "path": resolved,
        "meta": json.loads(json.dumps(meta)),
        "domains": {
            name: {
                "classes": list(d["classes"]),
                "splits": {s: dict(arrays) for s, arrays in d["splits"].items()},
            }
            for name, d in domains.items()
        },
    }


# Keyed on (path, mtime, size): a rebuilt file is re-read, repeated dataset construction is free.
@functools.lru_cache(maxsize=4)
def _load_cached(path: str, mtime_ns: int, size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    del mtime_ns, size  # only part of the cache key
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError) as exc:
        raise DataError(f"corrupt multi-domain data file {path}: {exc} ({_REBUILD_HINT})") from exc
    meta = _parse_meta(path, arrays)
    domains: dict[str, Any] = {}
    for name in meta["domains_order"]:
        domains[name] = _parse_domain(path, name, arrays)
    return meta, domains


def _parse_meta(path: str, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    if "meta" not in arrays:
        raise DataError(f"corrupt multi-domain data file {path}: no 'meta' entry")
    try:
        meta = json.loads(str(arrays["meta"]))
    except json.JSONDecodeError as exc:
        raise DataError(f"corrupt multi-domain data file {path}: bad metadata ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT_NAME:
        raise DataError(f"{path} is not an ftn multi-domain data file")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > _FORMAT_VERSION:
        raise DataError(
            f"{path} has format version {version!r}; this ftn reads up to {_FORMAT_VERSION}"
        )
    if not isinstance(meta.get("domains_order"), list) or not meta["domains_order"]:
        raise DataError(f"corrupt multi-domain data file {path}: metadata lists no domains")
    return meta


def _parse_domain(path: str, name: str, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    def entry(key: str) -> np.ndarray:
        if key not in arrays:
            raise DataError(f"corrupt multi-domain data file {path}: missing entry {key!r}")
        return arrays[key]

    classes = [str(c) for c in entry(f"{name}_classes").tolist()]
    splits: dict[str, dict[str, np.ndarray]] = {}
    for split in SPLITS:
        images = entry(f"{name}_{split}_images")
        labels = entry(f"{name}_{split}_labels").astype(np.int64)
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[0] != labels.shape[0]:
            raise DataError(
                f"corrupt multi-domain data file {path}: {name}/{split} images "
                f"{images.dtype}{list(images.shape)} do not match labels {list(labels.shape)}"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DataError(
                f"corrupt multi-domain data file {path}: {name}/{split} labels outside "
                f"0..{len(classes) - 1}"
            )
        images.setflags(write=False)
        labels.setflags(write=False)
        splits[split] = {"images": images, "labels": labels}
    return {"classes": classes, "splits": splits}


# --------------------------------------------------------------------------------------------
# datasets


class _ToThreeChannels(torch.nn.Module):
    """Repeat a 1-channel image to 3 channels (``v2.RGB`` needs torchvision >= 0.19)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.expand(3, -1, -1) if image.shape[-3] == 1 else image


def _check_image_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ConfigError(f"image_size must be an int >= 8, got {image_size!r}")
    return image_size


class MultiDomainDataset(Dataset[tuple[torch.Tensor, int]]):
    """One split of one domain of the embedded benchmark.

    Items are ``(image, label)``: ``image`` a float32 tensor ``[3, image_size, image_size]``
    normalised with the ImageNet mean/std, ``label`` an ``int`` in ``0..num_classes-1``.

    Args:
        domain: one of :data:`DOMAINS` (or any domain in a custom file given by ``path``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        image_size: output side length in pixels (images are square); the stored 28x28 images
            are upsampled bilinearly.
        train_augment: apply light random augmentation per item (random resized crop keeping
            75-100 % of the area, rotation up to 10 degrees, shifts up to 5 %). No flips: they
            would turn digits into other symbols. Uses torch's global RNG, as DataLoader workers
            expect.
        path: the ``.npz`` to read; ``None`` uses the packaged file.

    Raises:
        ConfigError: unknown domain or split, or a bad ``image_size``.
        DataError: the data file is missing or corrupt.
    """

    def __init__(
        self,
        domain: str,
        split: str,
        image_size: int = 64,
        train_augment: bool = False,
        path: str | Path | None = None,
    ) -> None:
        data = load_multidomain(path)
        if domain not in data["domains"]:
            raise ConfigError(f"unknown domain {domain!r}; available: {', '.join(data['domains'])}")
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; available: {', '.join(SPLITS)}")
        self.domain = domain
        self.split = split
        self.image_size = _check_image_size(image_size)
        self.train_augment = bool(train_augment)
        self.path: Path = data["path"]
        self.classes: list[str] = data["domains"][domain]["classes"]
        arrays = data["domains"][domain]["splits"][split]
        self.images: np.ndarray = arrays["images"]  # uint8 [N, 28, 28], read-only
        self.labels: np.ndarray = arrays["labels"]  # int64 [N], read-only
        self.transform = self._build_transform()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def targets(self) -> list[int]:
        """Labels as a list, under the name torchvision datasets use."""
        return [int(t) for t in self.labels]

    def _build_transform(self) -> v2.Compose:
        size = (self.image_size, self.image_size)
        # Convert to float before resizing: torchvision resizes uint8 tensors in uint8 and rounds,
        # which would make per-item output differ from as_tensors().
        steps: list[Any] = [v2.ToDtype(torch.float32, scale=True)]
        if self.train_augment:
            steps += [
                v2.RandomResizedCrop(size, scale=(0.75, 1.0), ratio=(0.9, 1.1), antialias=True),
                v2.RandomAffine(degrees=10.0, translate=(0.05, 0.05), fill=0.0),
            ]
        else:
            steps.append(v2.Resize(size, antialias=True))
        steps += [_ToThreeChannels(), v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))]
        return v2.Compose(steps)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # torch.tensor copies: the cached array is read-only and must stay untouched.
        image = torch.tensor(self.images[index]).unsqueeze(0)  # [1, 28, 28] uint8
        return self.transform(image), int(self.labels[index])

    def as_tensors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split, un-augmented, as ``(X [N, 3, S, S], y [N] int64)``.

        One batched interpolate instead of N per-image transforms, and no DataLoader
        collation per epoch: convert once, then slice mini-batches by index (about 0.1-0.4 s
        for 2,000 images at 64 px on 2 CPU cores). Values equal ``self[i]`` without
        augmentation up to float rounding (~1e-6). ``X`` is a fresh tensor the caller may modify.
        """
        x = torch.tensor(self.images, dtype=torch.float32).unsqueeze(1).div_(255.0)
        if self.image_size != x.shape[-1] or self.image_size != x.shape[-2]:
            x = F.interpolate(
                x,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x = (x.expand(-1, 3, -1, -1) - mean) / std
        return x.to(dtype), torch.tensor(self.labels, dtype=torch.int64)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(domain={self.domain!r}, split={self.split!r}, "
            f"n={len(self)}, classes={self.num_classes}, image_size={self.image_size}, "
            f"train_augment={self.train_augment})"
        )


def domain_datasets(
    domains: Iterable[str] = DOMAINS,
    image_size: int = 64,
    train_augment: bool = False,
    path: str | Path | None = None,
    splits: Sequence[str] = SPLITS,
) -> dict[str, dict[str, MultiDomainDataset]]:
    """Datasets for several domains: ``result[domain][split]``.

    ``train_augment`` applies to the ``train`` split only; evaluation splits are never augmented.
    """
    return {
        domain: {
            split: MultiDomainDataset(
                domain,
                split,
                image_size=image_size,
                train_augment=train_augment and split == "train",
                path=path,
            )
            for split in splits
        }
        for domain in domains
    }


# --------------------------------------------------------------------------------------------
# batched augmentation


def random_affine_batch(
    images: torch.Tensor,
    *,
    degrees: float = 10.0,
    translate: float = 0.05,
    scale: tuple[float, float] = (0.9, 1.1),
    fill: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random rotation, shift and zoom, different per image, for a whole batch at once.

    The batched counterpart of the per-item augmentation, for tensors from
    :meth:`MultiDomainDataset.as_tensors`: one ``affine_grid``/``grid_sample`` call instead of a
    Python loop over images.

    Args:
        images: ``[N, C, H, W]`` float tensor.
        degrees: maximum absolute rotation.
        translate: maximum shift as a fraction of the image side.
        scale: range of zoom factors (> 1 enlarges the content).
        fill: per-channel value for pixels that come from outside the image; ``None`` uses
            normalised black, ``-mean/std`` with the ImageNet statistics (for 3 channels) or 0.
        generator: random generator, for reproducible batches.

    Returns:
        A new tensor of the same shape and dtype.
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ConfigError(f"images must be a float [N, C, H, W] tensor, got {tuple(images.shape)}")
    n, c = images.shape[:2]
    device = images.device
    if fill is None:
        fill = (
            [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
            if c == 3
            else [0.0] * c
        )
    if len(fill) != c:
        raise ConfigError(f"fill has {len(fill)} values for {c} channels")

    def uniform(low: float, high: float) -> torch.Tensor:
        r = torch.rand(n, generator=generator, device=generator.device if generator else "cpu")
        return (low + (high - low) * r).to(device=device, dtype=torch.float32)

    angle = uniform(-degrees, degrees) * (math.pi / 180.0)
    zoom = uniform(scale[0], scale[1])
    # affine_grid works in [-1, 1] coordinates, where the full side is 2 units.
    tx = uniform(-translate, translate) * 2.0
    ty = uniform(-translate, translate) * 2.0
    # The grid maps output to input coordinates, hence the inverse zoom and opposite shift.
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos, -sin, -tx], dim=1), torch.stack([sin, cos, -ty], dim=1)], dim=1
    )
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    # grid_sample pads with zeros; shifting by the fill value makes the padding equal `fill`.
    offset = torch.tensor(fill, dtype=images.dtype, device=device).view(1, c, 1, 1)
    out = F.grid_sample(
        images - offset, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out + offset
