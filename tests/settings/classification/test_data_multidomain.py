"""The embedded multi-domain benchmark: the packaged file, its loader and the dataset views."""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ftn.settings.classification.multidomain import (
    DEFAULT_PATH,
    DOMAINS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SPLITS,
    MultiDomainDataset,
    domain_datasets,
    load_multidomain,
    random_affine_batch,
)
from ftn.core.errors import ConfigError, DataError

# The split sizes published in docs/data-card-multidomain.md.
EXPECTED_SIZES = {
    "mnist": {"train": 2000, "val": 500, "test": 1000},
    "fashion": {"train": 2000, "val": 500, "test": 1000},
    "animal": {"train": 2000, "val": 500, "test": 1000},
    "optdigits": {"train": 1000, "val": 300, "test": 497},
}
NORMALISED_BLACK = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])


def test_packaged_file_ships_inside_the_package() -> None:
    assert DEFAULT_PATH.is_file()
    assert DEFAULT_PATH.parts[-3:] == ("classification", "assets", "multidomain_v1.npz")
    assert DEFAULT_PATH.stat().st_size < 8 * 1024 * 1024


def test_packaged_file_has_four_domains_ten_classes_and_documented_sizes() -> None:
    data = load_multidomain()
    assert tuple(data["domains"]) == DOMAINS == ("mnist", "fashion", "animal", "optdigits")
    meta = data["meta"]
    assert meta["format"] == "ftn-multidomain" and meta["format_version"] == 1
    for name, domain in data["domains"].items():
        assert len(domain["classes"]) == 10
        assert len(set(domain["classes"])) == 10
        assert meta["domains"][name]["licence"]  # provenance recorded per domain
        for split in SPLITS:
            arrays = domain["splits"][split]
            images, labels = arrays["images"], arrays["labels"]
            assert images.dtype == np.uint8 and images.shape[1:] == (28, 28)
            assert len(images) == len(labels) == EXPECTED_SIZES[name][split]
            assert labels.min() >= 0 and labels.max() <= 9
            assert len(np.unique(labels)) == 10  # stratified: every class in every split
            assert meta["domains"][name]["counts"][split]["total"] == len(labels)


def test_class_names() -> None:
    domains = load_multidomain()["domains"]
    assert domains["mnist"]["classes"] == [str(d) for d in range(10)]
    assert domains["optdigits"]["classes"] == [str(d) for d in range(10)]
    assert domains["fashion"]["classes"][0] == "t-shirt/top"
    assert domains["fashion"]["classes"][9] == "ankle boot"
    assert domains["animal"]["classes"][0] == "bear"
    assert domains["animal"]["classes"][9] == "zebra"


def test_splits_share_no_image() -> None:
    for name, domain in load_multidomain()["domains"].items():
        seen: dict[bytes, str] = {}
        for split in SPLITS:
            for img in domain["splits"][split]["images"]:
                assert seen.setdefault(hashlib.blake2b(img.tobytes()).digest(), split) == split, (
                    f"{name}: an image appears in two splits"
                )


def test_arrays_are_read_only_and_cache_is_not_corrupted_by_callers() -> None:
    data = load_multidomain()
    images = data["domains"]["mnist"]["splits"]["train"]["images"]
    with pytest.raises(ValueError):
        images[0, 0, 0] = 1
    data["domains"]["mnist"]["classes"].append("extra")
    assert len(load_multidomain()["domains"]["mnist"]["classes"]) == 10


def test_dataset_items_are_normalised_3x64x64_with_int_labels() -> None:
    ds = MultiDomainDataset("fashion", "val")
    assert len(ds) == 500 and ds.num_classes == 10 and ds.classes[1] == "trouser"
    image, label = ds[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label < 10
    # Grayscale copied to 3 channels, then normalised per channel: a black corner pixel maps to
    # -mean/std in each channel.
    corner = image[:, 0, 0]
    assert torch.allclose(corner, NORMALISED_BLACK, atol=1e-5)
    assert image.max() <= (1 - min(IMAGENET_MEAN)) / min(IMAGENET_STD) + 1e-5


def test_dataset_is_deterministic_without_augmentation() -> None:
    a = MultiDomainDataset("animal", "test")
    b = MultiDomainDataset("animal", "test")
    for i in (0, 17, 999):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]


def test_as_tensors_matches_per_item_transform() -> None:
    ds = MultiDomainDataset("optdigits", "test", image_size=48)
    x, y = ds.as_tensors()
    assert x.shape == (497, 3, 48, 48) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.shape == (497,)
    assert int(y.min()) >= 0 and int(y.max()) < ds.num_classes
    for i in (0, 250, 496):
        image, label = ds[i]
        assert torch.allclose(x[i], image, atol=1e-5) and int(y[i]) == label


def test_as_tensors_at_native_size_skips_resizing() -> None:
    x, _ = MultiDomainDataset("mnist", "val", image_size=28).as_tensors()
    assert x.shape == (500, 3, 28, 28)


def test_train_augmentation_keeps_shape_and_follows_the_torch_seed() -> None:
    ds = MultiDomainDataset("mnist", "train", image_size=32, train_augment=True)
    torch.manual_seed(0)
    first = ds[5][0]
    torch.manual_seed(0)
    again = ds[5][0]
    torch.manual_seed(1)
    other = ds[5][0]
    assert first.shape == (3, 32, 32)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_domain_datasets_augments_train_only() -> None:
    sets = domain_datasets(["mnist", "optdigits"], image_size=32, train_augment=True)
    assert list(sets) == ["mnist", "optdigits"]
    assert list(sets["mnist"]) == list(SPLITS)
    assert sets["mnist"]["train"].train_augment
    assert not sets["mnist"]["val"].train_augment and not sets["mnist"]["test"].train_augment
    assert len(sets["optdigits"]["train"]) == 1000


@pytest.mark.parametrize(
    ("domain", "split", "size"),
    [("svhn", "train", 64), ("mnist", "validation", 64), ("mnist", "train", 4)],
)
def test_bad_arguments_raise_config_error(domain: str, split: str, size: int) -> None:
    with pytest.raises(ConfigError):
        MultiDomainDataset(domain, split, image_size=size)


def test_missing_file_raises_data_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.npz"
    with pytest.raises(DataError, match=r"nope\.npz"):
        load_multidomain(missing)
    with pytest.raises(DataError, match="not found"):
        MultiDomainDataset("mnist", "train", path=missing)


def test_garbage_file_raises_data_error(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.npz"
    bad.write_bytes(b"this is not a zip archive" * 10)
    with pytest.raises(DataError, match=r"garbage\.npz"):
        load_multidomain(bad)


def test_truncated_file_raises_data_error(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(DEFAULT_PATH.read_bytes()[:1_000_000])
    with pytest.raises(DataError, match="corrupt"):
        load_multidomain(truncated)


def test_foreign_npz_raises_data_error(tmp_path: Path) -> None:
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(3))
    with pytest.raises(DataError, match="no 'meta'"):
        load_multidomain(other)


def test_missing_entry_raises_data_error(tmp_path: Path) -> None:
    # Copy the real file without one array: the loader must name what is missing.
    partial = tmp_path / "partial.npz"
    with zipfile.ZipFile(DEFAULT_PATH) as src, zipfile.ZipFile(partial, "w") as dst:
        for info in src.infolist():
            if info.filename != "animal_val_labels.npy":
                dst.writestr(info, src.read(info.filename))
    with pytest.raises(DataError, match="animal_val_labels"):
        load_multidomain(partial)


def test_copied_file_loads_from_explicit_path(tmp_path: Path) -> None:
    copy = tmp_path / "copy.npz"
    shutil.copyfile(DEFAULT_PATH, copy)
    ds = MultiDomainDataset("optdigits", "val", path=copy)
    assert len(ds) == 300 and ds.path == copy.resolve()


def test_random_affine_batch() -> None:
    x, _ = MultiDomainDataset("mnist", "val", image_size=32).as_tensors()
    x = x[:16]
    identity = random_affine_batch(x, degrees=0.0, translate=0.0, scale=(1.0, 1.0))
    assert torch.allclose(identity, x, atol=1e-4)
    a = random_affine_batch(x, generator=torch.Generator().manual_seed(3))
    b = random_affine_batch(x, generator=torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.allclose(a, x)
    # Pixels pulled in from outside the frame are normalised black, not zero.
    shifted = random_affine_batch(
        x, degrees=0.0, translate=0.3, scale=(0.5, 0.5), generator=torch.Generator().manual_seed(0)
    )
    assert torch.allclose(shifted[:, :, 0, 0], NORMALISED_BLACK.expand(16, 3), atol=1e-4)
    with pytest.raises(ConfigError):
        random_affine_batch(x[0])
