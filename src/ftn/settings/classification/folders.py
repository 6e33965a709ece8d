"""Datasets over real-world image folders: DomainNet's layout and one ImageFolder per domain.

Both read images lazily with Pillow and treat an unreadable image the same way: by default
``__getitem__`` raises :class:`~ftn.core.errors.DataError` naming the file; with ``skip_corrupt=True``
the image is logged once, counted in ``.skipped`` and the next readable sample is returned instead,
so one bad file in a 600k-image crawl does not end a long training run.

The skip counters live in the dataset object, so with ``DataLoader(num_workers>0)`` each worker
process counts its own skips; the log warnings still name every file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from ...core.errors import DataError

__all__ = ["DomainNetDataset", "ImageFolderDomains", "load_image"]

logger = logging.getLogger(__name__)

Transform = Callable[[Any], Any]

# What Pillow raises for unreadable files: OSError covers missing files, UnidentifiedImageError
# (zero-byte or garbage files) and "image file is truncated"; SyntaxError and ValueError come from
# some broken PNG/GIF headers; DecompressionBombError is its own Exception subclass.
_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
)


def load_image(path: str | Path) -> Image.Image:
    """Open an image fully (not lazily) as RGB; any failure becomes a DataError naming the file."""
    try:
        with Image.open(path) as img:
            # convert() forces the full decode here, so truncated files fail now, not in a worker.
            return img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except _READ_ERRORS as exc:
        raise DataError(f"corrupt or unreadable image {path}: {exc}") from exc


class _SkipCorruptMixin:
    """Shared reading and ``skip_corrupt`` logic over ``self.samples`` (``(path, label)`` pairs).

    On an unreadable image in skip mode it moves on to the next readable one.
    """

    samples: Sequence[tuple[Any, int]]
    skip_corrupt: bool
    skipped: int
    skipped_files: list[str]
    _bad: set[int]

    def _init_skip(self, skip_corrupt: bool) -> None:
        self.skip_corrupt = bool(skip_corrupt)
        self.skipped = 0  # number of distinct unreadable images met so far
        self.skipped_files = []
        self._bad = set()

    def _read(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        return load_image(path), label

    def _read_with_skip(self, index: int) -> tuple[Image.Image, int]:
        n = len(self.samples)
        if index < 0:
            index += n
        if not 0 <= index < n:
            # IndexError (not wrap-around) keeps plain `for x in dataset` iteration terminating.
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        if not self.skip_corrupt:
            return self._read(index)
        # Walk forward (wrapping) from index to the next readable sample; known-bad ones are
        # passed over without touching the disk again.
        for offset in range(n):
            j = (index + offset) % n
            if j in self._bad:
                continue
            try:
                return self._read(j)
            except DataError as exc:
                self._bad.add(j)
                self.skipped += 1
                self.skipped_files.append(str(self.samples[j][0]))
                logger.warning("skipping unreadable image (%d so far): %s", self.skipped, exc)
        raise DataError(f"no readable image left in {self!r}: all {n} failed to load")


class DomainNetDataset(_SkipCorruptMixin, Dataset[tuple[Any, int]]):
    """One domain and split of DomainNet, from the official split lists.

    Layout (as distributed)::

        root/<domain>/<class>/<image>.jpg
        root/<domain>_train.txt        # lines "<domain>/<class>/<image>.jpg <label>"
        root/<domain>_test.txt

    Classes and labels come from the list file: ``classes[label]`` is the folder name that label
    appears with. Images are opened only in ``__getitem__``, so building the dataset does not stat
    every file.

    Args:
        root: the DomainNet root folder.
        domain: e.g. ``"clipart"``, ``"sketch"``.
        split: the list-file suffix, ``"train"`` or ``"test"`` in the official release.
        transform: applied to the RGB ``PIL.Image``; without one the PIL image is returned.
        target_transform: applied to the integer label.
        skip_corrupt: skip unreadable images (see the module docstring) instead of raising.

    Raises:
        DataError: the list file is missing or malformed (the message names it and the line).
    """

    def __init__(
        self,
        root: str | Path,
        domain: str,
        split: str,
        transform: Transform | None = None,
        skip_corrupt: bool = False,
        target_transform: Transform | None = None,
    ) -> None:
        self.root = Path(root)
        self.domain = domain
        self.split = split
        self.transform = transform
        self.target_transform = target_transform
        self.list_file = self.root / f"{domain}_{split}.txt"
        self.samples: list[tuple[Path, int]] = []
        self.classes: list[str] = []
        self._parse_list()
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.targets = [label for _, label in self.samples]
        self._init_skip(skip_corrupt)

    def _parse_list(self) -> None:
        try:
            text = self.list_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(
                f"DomainNet split list not found: {self.list_file} "
                f"(expected '<root>/<domain>_<split>.txt')"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read DomainNet split list {self.list_file}: {exc}") from exc
        names: dict[int, str] = {}
        for lineno, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line:
                continue
            # rsplit: the label is the last field; paths in the official lists have no spaces,
            # but splitting from the right keeps one with spaces intact.
            parts = line.rsplit(maxsplit=1)
            where = f"{self.list_file}:{lineno}"
            if len(parts) != 2:
                raise DataError(f"{where}: expected '<path> <label>', got {line!r}")
            rel, label_text = parts
            try:
                label = int(label_text)
            except ValueError:
                raise DataError(f"{where}: label {label_text!r} is not an integer") from None
            pieces = Path(rel).parts
            if label < 0 or len(pieces) < 3:
                raise DataError(
                    f"{where}: expected '<domain>/<class>/<file> <label>' with label >= 0, "
                    f"got {line!r}"
                )
            class_name = pieces[-2]
            if names.setdefault(label, class_name) != class_name:
                raise DataError(
                    f"{where}: label {label} is used for class {class_name!r} "
                    f"and also for {names[label]!r}"
                )
            self.samples.append((self.root / rel, label))
        if not self.samples:
            raise DataError(f"DomainNet split list {self.list_file} lists no images")
        # Labels index classes directly; a label absent from this list keeps a placeholder name
        # so that label -> name stays aligned with the full 345-class label space.
        self.classes = [names.get(i, f"<label {i}>") for i in range(max(names) + 1)]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, label = self._read_with_skip(index)
        sample: Any = self.transform(image) if self.transform is not None else image
        target: Any = self.target_transform(label) if self.target_transform is not None else label
        return sample, target

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, domain={self.domain!r}, "
            f"split={self.split!r}, n={len(self)}, classes={self.num_classes})"
        )


class _CheckedImageFolder(_SkipCorruptMixin, ImageFolder):
    """ImageFolder with a fixed class list, DataError on unreadable images and skip mode."""

    def __init__(
        self,
        root: Path,
        classes: Sequence[str],
        transform: Transform | None,
        target_transform: Transform | None,
        skip_corrupt: bool,
    ) -> None:
        self._fixed_classes = list(classes)
        super().__init__(
            str(root),
            transform=transform,
            target_transform=target_transform,
            loader=load_image,
            allow_empty=True,  # a split may lack some class; labels still come from the union
        )
        self._init_skip(skip_corrupt)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        # Same classes (and so the same labels) for every split of a domain, even when one split
        # misses a class folder; ImageFolder alone would silently shift the labels.
        return list(self._fixed_classes), {c: i for i, c in enumerate(self._fixed_classes)}

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, label = self._read_with_skip(index)
        sample: Any = self.transform(image) if self.transform is not None else image
        target: Any = self.target_transform(label) if self.target_transform is not None else label
        return sample, target


class ImageFolderDomains(Mapping[str, dict[str, ImageFolder]]):
    """One ``torchvision.datasets.ImageFolder`` per domain and split.

    Layout::

        root/<domain>/<split>/<class>/<image>.jpg

    ``domains_obj[domain][split]`` is an ImageFolder (a subclass: unreadable images raise
    :class:`~ftn.core.errors.DataError` naming the file, or are skipped with ``skip_corrupt=True``).
    Within a domain every split shares one class list, the sorted union of the class folders of
    all its splits, so a class missing from one split does not shift the labels of the others.
    Different domains keep separate label spaces.

    Args:
        root: the folder holding one sub-folder per domain.
        domains: the domains to load.
        split_dirs: the split folder names every domain must have.
        transform: one transform for all splits, or a mapping ``split -> transform`` (splits not
            in the mapping get none), e.g. augmentation for ``"train"`` only.
        target_transform: applied to the integer label.
        skip_corrupt: skip unreadable images instead of raising.

    Raises:
        DataError: a domain or split folder is missing or holds no class folder.
    """

    def __init__(
        self,
        root: str | Path,
        domains: Sequence[str],
        split_dirs: Sequence[str] = ("train", "val", "test"),
        transform: Transform | Mapping[str, Transform] | None = None,
        target_transform: Transform | None = None,
        skip_corrupt: bool = False,
    ) -> None:
        self.root = Path(root)
        self.domains = tuple(domains)
        self.split_dirs = tuple(split_dirs)
        if not self.domains:
            raise DataError("ImageFolderDomains needs at least one domain")
        self.classes: dict[str, list[str]] = {}
        self._datasets: dict[str, dict[str, ImageFolder]] = {}
        for domain in self.domains:
            split_paths = {split: self.root / domain / split for split in self.split_dirs}
            for path in split_paths.values():
                if not path.is_dir():
                    raise DataError(f"missing split folder {path} (expected root/<domain>/<split>)")
            classes = sorted(
                {
                    entry.name
                    for p in split_paths.values()
                    for entry in p.iterdir()
                    if entry.is_dir()
                }
            )
            if not classes:
                raise DataError(f"no class folders under {self.root / domain}/<split>/")
            self.classes[domain] = classes
            self._datasets[domain] = {
                split: _CheckedImageFolder(
                    path,
                    classes,
                    transform=(
                        transform.get(split) if isinstance(transform, Mapping) else transform
                    ),
                    target_transform=target_transform,
                    skip_corrupt=skip_corrupt,
                )
                for split, path in split_paths.items()
            }

    def num_classes(self, domain: str) -> int:
        return len(self.classes[domain])

    @property
    def skipped(self) -> int:
        """Unreadable images skipped so far, over every domain and split."""
        return sum(
            getattr(ds, "skipped", 0)
            for splits in self._datasets.values()
            for ds in splits.values()
        )

    def __getitem__(self, domain: str) -> dict[str, ImageFolder]:
        try:
            return self._datasets[domain]
        except KeyError:
            raise KeyError(
                f"unknown domain {domain!r}; loaded: {', '.join(self.domains)}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._datasets)

    def __len__(self) -> int:
        return len(self._datasets)

    def __repr__(self) -> str:
        sizes = ", ".join(
            f"{d}: " + "/".join(str(len(ds)) for ds in splits.values())
            for d, splits in self._datasets.items()
        )
        return f"{type(self).__name__}(root={str(self.root)!r}, splits={self.split_dirs}, {sizes})"
