"""NYUD-v2 multi-task dataset and joint (image + every label) augmentations.

The on-disk layout is the one of Multi-Task-Learning-PyTorch's ``NYUD_MT`` folder, which
:func:`ftn.settings.dense.scenes.write_nyud_layout` also writes::

    root/images/<id>.jpg         RGB
    root/segmentation/<id>.png   uint8 labels
    root/depth/<id>.npy          float H×W, metres, 0 = invalid
    root/normals/<id>.npy        float H×W×3 in [-1, 1], 0 = invalid
    root/edge/<id>.npy           float H×W in {0, 1}
    root/gt_sets/{train,val}.txt one id per line

Label conventions differ in one place: the real NYUD PNGs store 0 = void and classes 1..40,
which (like Multi-Task-Learning-PyTorch) we map to 255 and 0..39; our synthetic scenes store
classes from 0 with 255 = void and say so in ``classes.json`` (``"zero_is_void": false``).

A sample is a dict of tensors: ``image`` float 3×H×W (ImageNet-normalised), ``semseg`` long H×W
(255 = ignore), ``depth`` float 1×H×W (0 = invalid), ``normals`` float 3×H×W (0 = invalid),
``edge`` float 1×H×W (in {0, 1}; 255 = ignore where augmentation padded), and ``meta``.

Augmentations work on that dict *before* normalisation, with the image in [0, 1], so that any
padding can use the mean colour (which normalises to exactly 0).

Where each task's labels lie, how they are read and how augmentation treats them is the task's
record (:mod:`ftn.settings.dense.tasks`); every registered task can be loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from ...core.errors import ConfigError, DataError
from .tasks import TASKS, dense_task, dense_task_names

__all__ = [
    "NYUDMultiTask",
    "TASKS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "JointCompose",
    "RandomScale",
    "RandomCrop",
    "RandomHorizontalFlip",
    "Resize",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGES = ("images", ".jpg")

Sample = dict[str, Any]


class NYUDMultiTask(Dataset[Sample]):
    """NYUD multi-task split (real NYUD-v2 or :mod:`ftn.settings.dense.scenes` output).

    Args:
        root: folder with the layout in the module docstring.
        split: name of a list in ``root/gt_sets`` (``"train"``, ``"val"``...).
        tasks: labels to load, registered dense tasks (default: every one, see
            :func:`~ftn.settings.dense.tasks.dense_task_names`).
        transform: callable on the sample dict (tensors, image in [0, 1]), applied before the
            image is normalised; e.g. ``JointCompose([RandomScale(), RandomCrop(...), ...])``.
        normalize: subtract the ImageNet mean and divide by its std (after ``transform``).
        zero_is_void: whether PNG label 0 means void (real NYUD). ``None`` reads
            ``classes.json`` when present and otherwise assumes the real NYUD convention.

    Every listed file is checked to exist when the dataset is built, so a broken folder fails at
    once rather than mid-epoch; unreadable files raise :class:`DataError` naming the file.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        tasks: Sequence[str] | None = None,
        transform: Callable[[Sample], Sample] | None = None,
        normalize: bool = True,
        zero_is_void: bool | None = None,
    ) -> None:
        self.root = Path(root)
        tasks = dense_task_names() if tasks is None else tasks
        unknown = [t for t in tasks if t not in dense_task_names()]
        if unknown:
            raise ConfigError(f"unknown NYUD task(s) {unknown}; known: {list(dense_task_names())}")
        self.tasks = tuple(tasks)
        self.split = split
        self.transform = transform
        self.normalize = normalize
        self.class_names: list[str] | None = None

        meta_file = self.root / "classes.json"
        meta: dict[str, Any] = {}
        if meta_file.is_file():
            try:
                meta = json.loads(meta_file.read_text())
            except (OSError, ValueError) as e:
                raise DataError(f"{meta_file}: unreadable class list ({e})") from e
            if not isinstance(meta, dict):
                raise DataError(f"{meta_file}: expected a JSON object with a 'classes' list")
            self.class_names = list(meta.get("classes", [])) or None
        self.zero_is_void = bool(meta.get("zero_is_void", True)) if zero_is_void is None else zero_is_void

        split_file = self.root / "gt_sets" / f"{split}.txt"
        if not split_file.is_file():
            raise DataError(f"split list not found: {split_file}")
        self.ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        if not self.ids:
            raise DataError(f"split list is empty: {split_file}")
        missing = [str(self._path(k, i)) for i in self.ids for k in ("image", *self.tasks)
                   if not self._path(k, i).is_file()]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise DataError(f"{len(missing)} file(s) of split {split!r} missing: {', '.join(missing[:5])}{more}")

    def _path(self, key: str, sample_id: str) -> Path:
        folder, ext = _IMAGES if key == "image" else (dense_task(key).folder, dense_task(key).suffix)
        return self.root / folder / f"{sample_id}{ext}"

    def __len__(self) -> int:
        return len(self.ids)

    # -- loading ------------------------------------------------------------------------------

    @staticmethod
    def _open_image(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as im:
                return np.array(im.convert("RGB"))  # decodes now, so truncation shows here
        except (OSError, UnidentifiedImageError, ValueError) as e:  # truncated/corrupt/unknown
            raise DataError(f"{path}: cannot read image ({e})") from e

    def _load(self, task: str, sample_id: str, hw: tuple[int, int]) -> Tensor:
        path = self._path(task, sample_id)
        label = dense_task(task).read(path, self)
        if tuple(label.shape[-2:]) != hw:
            raise DataError(f"{path}: size {tuple(label.shape[-2:])} differs from the image's {hw}")
        return label

    def __getitem__(self, index: int) -> Sample:
        sample_id = self.ids[index]
        img = self._open_image(self._path("image", sample_id))
        hw = (img.shape[0], img.shape[1])
        sample: Sample = {"image": torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0}
        for task in self.tasks:
            sample[task] = self._load(task, sample_id, hw)
        sample["meta"] = {"id": sample_id, "index": index, "size": hw}
        if self.transform is not None:
            sample = self.transform(sample)
        if self.normalize:
            mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
            sample["image"] = (sample["image"] - mean) / std
        return sample

    def __repr__(self) -> str:
        return f"NYUDMultiTask(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, tasks={self.tasks})"


# --------------------------------------------------------------------------------------------
# Joint augmentations. All of them take and return the sample dict; spatial keys they do not
# know (e.g. "meta") pass through untouched. Randomness comes from torch's global generator (or
# the one given), so DataLoader worker seeding applies as for any torchvision transform. What
# they do to a task's labels is in its record (pad value, smooth resize, mirroring).


def _spatial() -> tuple[str, ...]:
    return ("image", *dense_task_names())


def _rand(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def _resize(sample: Sample, size: tuple[int, int], normals_mode: str) -> Sample:
    """Resize every spatial entry to ``size``: bilinear for the image, nearest for labels and
    depth (averaging depths across an object boundary would invent surfaces that are not there);
    with ``normals_mode="bilinear"``, the tasks with a smooth resize (normals: bilinear, then
    renormalised) use it."""
    out = dict(sample)
    for key in _spatial():
        if key not in sample:
            continue
        x = sample[key]
        smooth = None if key == "image" else dense_task(key).smooth_resize
        if key == "image":
            out[key] = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
        elif smooth is not None and normals_mode == "bilinear":
            out[key] = smooth(x, size)
        else:
            y = x[None, None] if x.dim() == 2 else x[None]
            y = F.interpolate(y.float(), size=size, mode="nearest-exact")
            out[key] = (y[0, 0] if x.dim() == 2 else y[0]).to(x.dtype)
    return out


class JointCompose:
    """Apply joint transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[Sample], Sample]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __repr__(self) -> str:
        return f"JointCompose({self.transforms})"


class Resize:
    """Deterministic resize to ``size`` = (height, width) (e.g. for evaluation)."""

    def __init__(self, size: int | Sequence[int], normals_mode: str = "nearest") -> None:
        self.size = _pair(size)
        self.normals_mode = _check_mode(normals_mode)

    def __call__(self, sample: Sample) -> Sample:
        return _resize(sample, self.size, self.normals_mode)


class RandomScale:
    """Rescale by a factor drawn uniformly from ``scales`` = (min, max) (RCM: 0.5–2.0).

    Depth values are *not* divided by the factor: like Multi-Task-Learning-PyTorch we treat
    scaling as a zoom of the same metric scene. Normals use nearest interpolation by default
    (``normals_mode="bilinear"`` renormalises after interpolating).
    """

    def __init__(self, scales: tuple[float, float] = (0.5, 2.0), normals_mode: str = "nearest",
                 generator: torch.Generator | None = None) -> None:
        if not 0 < scales[0] <= scales[1]:
            raise ConfigError(f"scales must satisfy 0 < min <= max, got {scales}")
        self.scales = scales
        self.normals_mode = _check_mode(normals_mode)
        self.generator = generator

    def __call__(self, sample: Sample) -> Sample:
        s = self.scales[0] + (self.scales[1] - self.scales[0]) * _rand(self.generator)
        h, w = sample["image"].shape[-2:]
        return _resize(sample, (max(1, round(h * s)), max(1, round(w * s))), self.normals_mode)


class RandomCrop:
    """Random ``size`` crop, padding first (bottom/right) where the sample is smaller.

    Padding values mark "no information": image = ``image_fill`` (the ImageNet mean, which
    normalises to 0), labels their task's ``pad_value``: semseg and edge = 255 (ignored by the
    losses/metrics here), depth = 0 and normals = 0 (invalid).
    """

    def __init__(self, size: int | Sequence[int], image_fill: Sequence[float] = IMAGENET_MEAN,
                 generator: torch.Generator | None = None) -> None:
        self.size = _pair(size)
        self.image_fill = tuple(float(v) for v in image_fill)
        self.generator = generator

    def __call__(self, sample: Sample) -> Sample:
        th, tw = self.size
        h, w = sample["image"].shape[-2:]
        ph, pw = max(0, th - h), max(0, tw - w)
        out = dict(sample)
        if ph or pw:
            for key in _spatial():
                if key not in sample:
                    continue
                x = sample[key]
                if key == "image":
                    fill = torch.tensor(self.image_fill, dtype=x.dtype).view(3, 1, 1)
                    out[key] = F.pad(x - fill, (0, pw, 0, ph)) + fill
                else:
                    out[key] = F.pad(x, (0, pw, 0, ph), value=dense_task(key).pad_value)
            h, w = h + ph, w + pw
        top = int(_rand(self.generator) * (h - th + 1))
        left = int(_rand(self.generator) * (w - tw + 1))
        for key in _spatial():
            if key in out:
                out[key] = out[key][..., top:top + th, left:left + tw]
        return out


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``; a task's ``mirror`` then fixes up its labels.
    Normals are in a camera frame whose x axis points right, so mirroring the image negates
    their x component (y and z are unchanged)."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        self.p = p
        self.generator = generator

    def __call__(self, sample: Sample) -> Sample:
        if _rand(self.generator) >= self.p:
            return sample
        out = dict(sample)
        for key in _spatial():
            if key in sample:
                out[key] = sample[key].flip(-1)
        for key in dense_task_names():
            mirror = dense_task(key).mirror
            if key in out and mirror is not None:
                out[key] = mirror(out[key])
        return out


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if len(size) != 2:
        raise ConfigError(f"size must be an int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def _check_mode(mode: str) -> str:
    if mode not in ("nearest", "bilinear"):
        raise ConfigError(f"normals_mode must be 'nearest' or 'bilinear', got {mode!r}")
    return mode

