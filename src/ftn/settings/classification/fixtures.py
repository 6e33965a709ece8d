"""Tiny on-disk image datasets in real-world layouts, for tests, examples and smoke configs.

The images are small synthetic JPEGs (a class-specific colour and stripe pattern, a
domain-specific style, plus noise), so a model can actually learn them, yet every file is a real
JPEG that goes through the same loading code as DomainNet or an ImageFolder tree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "DomainNetFixture",
    "ImageFolderFixture",
    "write_domainnet_fixture",
    "write_imagefolder_fixture",
]

# The first class folders of the real DomainNet release (labels 0..9 there); fixtures with more
# classes continue with generic names.
_DOMAINNET_CLASSES = (
    "aircraft_carrier", "airplane", "alarm_clock", "ambulance", "angel",
    "animal_migration", "ant", "anvil", "apple", "arm",
)  # fmt: skip


def _class_names(count: int) -> list[str]:
    if count < 1:
        raise ValueError(f"need at least one class, got {count}")
    return [_DOMAINNET_CLASSES[i] if i < len(_DOMAINNET_CLASSES) else f"class_{i:03d}"
            for i in range(count)]  # fmt: skip


def _synthetic_image(
    rng: np.random.Generator, label: int, num_classes: int, domain_index: int, size: int
) -> Image.Image:
    """An RGB image whose hue and stripe orientation encode the class, its style the domain."""
    hue = label / num_classes
    base = np.array([np.cos(2 * np.pi * (hue + k / 3)) * 0.5 + 0.5 for k in range(3)])
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    angle = np.pi * label / num_classes
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * (xx * np.cos(angle) + yy * np.sin(angle)))
    img = base[None, None, :] * (0.5 + 0.5 * stripes[..., None])
    if domain_index % 2 == 1:  # a "sketch"-like domain: desaturated and lighter
        img = 0.3 * img + 0.7 * img.mean(axis=2, keepdims=True) + 0.2
    img = img + rng.normal(0.0, 0.05, size=img.shape)
    return Image.fromarray(np.clip(img * 255.0, 0, 255).astype(np.uint8), mode="RGB")


def _split_counts(per_class: int, fractions: Sequence[float]) -> list[int]:
    """Split ``per_class`` images between splits; every split gets at least one when possible."""
    counts = [max(1, round(per_class * f)) for f in fractions[1:]]
    first = per_class - sum(counts)
    if first < 1:
        raise ValueError(f"per_class={per_class} is too small for {len(fractions)} splits")
    return [first, *counts]


@dataclass
class DomainNetFixture:
    """What :func:`write_domainnet_fixture` wrote: ``lists[(domain, split)]`` holds the
    ``(relative path, label)`` pairs of that list file, in file order."""

    root: Path
    domains: tuple[str, ...]
    classes: list[str]
    lists: dict[tuple[str, str], list[tuple[str, int]]] = field(default_factory=dict)

    def list_file(self, domain: str, split: str) -> Path:
        return self.root / f"{domain}_{split}.txt"

    def image_path(self, domain: str, split: str, index: int) -> Path:
        return self.root / self.lists[(domain, split)][index][0]


def write_domainnet_fixture(
    root: str | Path,
    domains: Sequence[str] = ("clipart", "sketch"),
    classes: int = 3,
    per_class: int = 4,
    size: int = 32,
    seed: int = 0,
) -> DomainNetFixture:
    """Write a miniature DomainNet: ``root/<domain>/<class>/<domain>_<NNN>_<NNNNNN>.jpg`` plus
    the official-style split lists ``root/<domain>_train.txt`` and ``root/<domain>_test.txt``.

    Per class, a quarter of the images (at least one) go to the test list, the rest to train.
    Deterministic for a given ``seed``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    names = _class_names(classes)
    n_train, _ = _split_counts(per_class, (0.75, 0.25))
    fixture = DomainNetFixture(root=root, domains=tuple(domains), classes=names)
    for d_index, domain in enumerate(domains):
        lists: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
        for label, name in enumerate(names):
            folder = root / domain / name
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                # The release names files "<domain>_<class number, 1-based>_<serial>.jpg".
                rel = f"{domain}/{name}/{domain}_{label + 1:03d}_{j:06d}.jpg"
                _synthetic_image(rng, label, classes, d_index, size).save(root / rel, quality=90)
                lists["train" if j < n_train else "test"].append((rel, label))
        for split, entries in lists.items():
            text = "".join(f"{rel} {label}\n" for rel, label in entries)
            (root / f"{domain}_{split}.txt").write_text(text, encoding="utf-8")
            fixture.lists[(domain, split)] = entries
    return fixture


@dataclass
class ImageFolderFixture:
    """What :func:`write_imagefolder_fixture` wrote: ``files[(domain, split)]`` holds the
    ``(path, class index)`` pairs in sorted path order, as ImageFolder lists them."""

    root: Path
    domains: tuple[str, ...]
    splits: tuple[str, ...]
    classes: list[str]
    files: dict[tuple[str, str], list[tuple[Path, int]]] = field(default_factory=dict)


def write_imagefolder_fixture(
    root: str | Path,
    domains: Sequence[str] = ("photos", "paintings"),
    splits: Sequence[str] = ("train", "val", "test"),
    classes: int = 3,
    per_class: int = 2,
    size: int = 32,
    seed: int = 0,
) -> ImageFolderFixture:
    """Write ``root/<domain>/<split>/<class>/<NNN>.jpg`` with ``per_class`` images per class and
    split. Class names sort in label order, as ImageFolder assigns labels by sorted name."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    names = _class_names(classes)
    fixture = ImageFolderFixture(
        root=root, domains=tuple(domains), splits=tuple(splits), classes=sorted(names)
    )
    for d_index, domain in enumerate(domains):
        for split in splits:
            entries = []
            for name in names:
                folder = root / domain / split / name
                folder.mkdir(parents=True, exist_ok=True)
                label = fixture.classes.index(name)
                for j in range(per_class):
                    path = folder / f"{j:03d}.jpg"
                    _synthetic_image(rng, label, classes, d_index, size).save(path, quality=90)
                    entries.append((path, label))
            fixture.files[(domain, split)] = sorted(entries)
    return fixture
