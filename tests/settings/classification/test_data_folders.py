"""DomainNet-layout and ImageFolder-per-domain datasets, on tiny fixtures written to tmp_path."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from ftn.settings.classification.fixtures import (
    DomainNetFixture,
    ImageFolderFixture,
    write_domainnet_fixture,
    write_imagefolder_fixture,
)
from ftn.settings.classification.folders import DomainNetDataset, ImageFolderDomains, load_image
from ftn.core.errors import DataError

TO_TENSOR = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


@pytest.fixture
def domainnet(tmp_path: Path) -> DomainNetFixture:
    """2 domains x 3 classes x 4 images of 32 px: 3 per class in train, 1 in test."""
    return write_domainnet_fixture(tmp_path / "domainnet")


@pytest.fixture
def imagefolders(tmp_path: Path) -> ImageFolderFixture:
    return write_imagefolder_fixture(tmp_path / "folders", domains=("photos", "paintings"))


def _corrupt(path: Path, kind: str) -> None:
    if kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"\x89 definitely not an image \x00\xff" * 8)
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:  # pragma: no cover - test helper misuse
        raise ValueError(kind)


# --- the fixture writer -----------------------------------------------------------------------


def test_fixture_layout_matches_domainnet(domainnet: DomainNetFixture) -> None:
    root = domainnet.root
    assert (root / "clipart_train.txt").is_file() and (root / "sketch_test.txt").is_file()
    first = (root / "clipart_train.txt").read_text().splitlines()[0]
    assert first == "clipart/aircraft_carrier/clipart_001_000000.jpg 0"
    for (domain, split), entries in domainnet.lists.items():
        assert len(entries) == {"train": 9, "test": 3}[split]
        for rel, label in entries:
            assert rel.startswith(f"{domain}/{domainnet.classes[label]}/")
            with Image.open(root / rel) as img:
                assert img.format == "JPEG" and img.size == (32, 32)


def test_fixture_is_deterministic(tmp_path: Path) -> None:
    a = write_domainnet_fixture(tmp_path / "a", seed=5)
    b = write_domainnet_fixture(tmp_path / "b", seed=5)
    rel = a.lists[("sketch", "test")][0][0]
    assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes()


# --- DomainNetDataset ---------------------------------------------------------------------------


def test_domainnet_loads_labels_and_classes(domainnet: DomainNetFixture) -> None:
    ds = DomainNetDataset(domainnet.root, "clipart", "train")
    assert len(ds) == 9
    assert ds.classes == ["aircraft_carrier", "airplane", "alarm_clock"]
    assert ds.num_classes == 3 and ds.class_to_idx["airplane"] == 1
    assert ds.targets == [label for _, label in domainnet.lists[("clipart", "train")]]
    image, label = ds[4]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)
    assert label == domainnet.lists[("clipart", "train")][4][1]
    test = DomainNetDataset(domainnet.root, "sketch", "test")
    assert len(test) == 3 and test.targets == [0, 1, 2]


def test_domainnet_transform_and_dataloader(domainnet: DomainNetFixture) -> None:
    transform = v2.Compose([TO_TENSOR, v2.Resize((16, 16), antialias=True)])
    ds = DomainNetDataset(domainnet.root, "sketch", "train", transform=transform)
    image, label = ds[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label == 0
    batch, labels = next(iter(torch.utils.data.DataLoader(ds, batch_size=9)))
    assert batch.shape == (9, 3, 16, 16) and labels.tolist() == ds.targets


def test_domainnet_plain_iteration_stops(domainnet: DomainNetFixture) -> None:
    ds = DomainNetDataset(domainnet.root, "clipart", "test", skip_corrupt=True)
    assert len(list(ds)) == 3
    with pytest.raises(IndexError):
        ds[3]


def test_domainnet_missing_split_file_names_it(domainnet: DomainNetFixture) -> None:
    with pytest.raises(DataError, match=r"clipart_val\.txt"):
        DomainNetDataset(domainnet.root, "clipart", "val")
    with pytest.raises(DataError, match=r"painting_train\.txt"):
        DomainNetDataset(domainnet.root, "painting", "train")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("clipart/airplane/x.jpg", "expected '<path> <label>'"),
        ("clipart/airplane/x.jpg one", "not an integer"),
        ("x.jpg 1", "expected '<domain>/<class>/<file> <label>'"),
        ("clipart/airplane/x.jpg -1", "label >= 0"),
    ],
)
def test_domainnet_malformed_list_names_file_and_line(
    domainnet: DomainNetFixture, line: str, message: str
) -> None:
    list_file = domainnet.list_file("clipart", "train")
    list_file.write_text(list_file.read_text() + line + "\n")
    with pytest.raises(DataError, match=r"clipart_train\.txt:10") as info:
        DomainNetDataset(domainnet.root, "clipart", "train")
    assert message in str(info.value)


def test_domainnet_conflicting_class_for_label(domainnet: DomainNetFixture) -> None:
    list_file = domainnet.list_file("clipart", "test")
    list_file.write_text(list_file.read_text() + "clipart/ambulance/y.jpg 0\n")
    with pytest.raises(DataError, match="label 0"):
        DomainNetDataset(domainnet.root, "clipart", "test")


def test_domainnet_empty_list(domainnet: DomainNetFixture) -> None:
    domainnet.list_file("sketch", "test").write_text("\n")
    with pytest.raises(DataError, match="lists no images"):
        DomainNetDataset(domainnet.root, "sketch", "test")


def test_domainnet_label_gaps_keep_label_alignment(domainnet: DomainNetFixture) -> None:
    # A list with labels 0 and 2 only: class 2 must stay label 2.
    domainnet.list_file("sketch", "test").write_text(
        "sketch/aircraft_carrier/sketch_001_000003.jpg 0\n"
        "sketch/alarm_clock/sketch_003_000003.jpg 2\n"
    )
    ds = DomainNetDataset(domainnet.root, "sketch", "test")
    assert ds.classes[0] == "aircraft_carrier" and ds.classes[2] == "alarm_clock"
    assert ds.num_classes == 3 and ds[1][1] == 2


@pytest.mark.parametrize("kind", ["zero-byte", "garbage", "truncated"])
def test_domainnet_corrupt_image_error_names_the_file(
    domainnet: DomainNetFixture, kind: str
) -> None:
    bad = domainnet.image_path("clipart", "train", 2)
    _corrupt(bad, kind)
    ds = DomainNetDataset(domainnet.root, "clipart", "train")
    ds[1]  # the others still load
    with pytest.raises(DataError) as info:
        ds[2]
    assert str(bad) in str(info.value)


def test_domainnet_missing_image_error_names_the_file(domainnet: DomainNetFixture) -> None:
    gone = domainnet.image_path("sketch", "test", 1)
    gone.unlink()
    ds = DomainNetDataset(domainnet.root, "sketch", "test")
    with pytest.raises(DataError, match="not found") as info:
        ds[1]
    assert str(gone) in str(info.value)


def test_domainnet_skip_mode_counts_and_warns(
    domainnet: DomainNetFixture, caplog: pytest.LogCaptureFixture
) -> None:
    _corrupt(domainnet.image_path("clipart", "train", 3), "zero-byte")
    _corrupt(domainnet.image_path("clipart", "train", 4), "garbage")
    entries = domainnet.lists[("clipart", "train")]
    ds = DomainNetDataset(
        domainnet.root, "clipart", "train", transform=TO_TENSOR, skip_corrupt=True
    )
    with caplog.at_level(logging.WARNING, logger="ftn.settings.classification.folders"):
        image, label = ds[3]  # 3 and 4 are bad: sample 5 comes back
    assert label == entries[5][1] and image.shape == (3, 32, 32)
    assert ds.skipped == 2
    assert ds.skipped_files == [str(domainnet.image_path("clipart", "train", i)) for i in (3, 4)]
    assert len(caplog.records) == 2
    assert entries[3][0].split("/")[-1] in caplog.records[0].getMessage()
    # Known-bad images are counted once, however often they are asked for.
    assert ds[4][1] == entries[5][1]
    assert ds.skipped == 2
    assert sum(1 for _ in ds) == len(ds)


def test_domainnet_skip_mode_wraps_around_and_fails_when_nothing_is_readable(
    domainnet: DomainNetFixture,
) -> None:
    for i in range(3):
        _corrupt(domainnet.image_path("sketch", "test", i), "garbage")
    ds = DomainNetDataset(domainnet.root, "sketch", "test", skip_corrupt=True)
    with pytest.raises(DataError, match="no readable image"):
        ds[2]
    assert ds.skipped == 3


def test_load_image_returns_rgb(tmp_path: Path) -> None:
    gray = tmp_path / "gray.png"
    Image.new("L", (5, 4), color=128).save(gray)
    img = load_image(gray)
    assert img.mode == "RGB" and img.size == (5, 4)


# --- ImageFolderDomains ---------------------------------------------------------------------------


def test_imagefolder_domains_loads_every_domain_and_split(imagefolders: ImageFolderFixture) -> None:
    domains = ImageFolderDomains(imagefolders.root, ["photos", "paintings"])
    assert list(domains) == ["photos", "paintings"] and len(domains) == 2
    for domain in domains:
        assert list(domains[domain]) == ["train", "val", "test"]
        assert domains.classes[domain] == imagefolders.classes and domains.num_classes(domain) == 3
        for split, ds in domains[domain].items():
            expected = imagefolders.files[(domain, split)]
            assert len(ds) == 6 and ds.targets == [label for _, label in expected]
            image, label = ds[5]
            assert isinstance(image, Image.Image) and label == expected[5][1]


def test_imagefolder_domains_per_split_transforms(imagefolders: ImageFolderFixture) -> None:
    small = v2.Compose([TO_TENSOR, v2.Resize((8, 8), antialias=True)])
    domains = ImageFolderDomains(
        imagefolders.root, ["photos"], split_dirs=("train", "test"), transform={"train": small}
    )
    assert domains["photos"]["train"][0][0].shape == (3, 8, 8)
    assert isinstance(domains["photos"]["test"][0][0], Image.Image)


def test_imagefolder_domains_keeps_labels_when_a_split_lacks_a_class(
    imagefolders: ImageFolderFixture,
) -> None:
    # Remove the first class from val only: the other classes must keep their labels.
    for path, _ in imagefolders.files[("photos", "val")][:2]:
        path.unlink()
    path.parent.rmdir()
    domains = ImageFolderDomains(imagefolders.root, ["photos"])
    val = domains["photos"]["val"]
    assert val.classes == imagefolders.classes
    assert sorted(set(val.targets)) == [1, 2]


def test_imagefolder_domains_missing_folders(imagefolders: ImageFolderFixture) -> None:
    with pytest.raises(DataError, match="cartoons"):
        ImageFolderDomains(imagefolders.root, ["photos", "cartoons"])
    with pytest.raises(DataError, match="holdout"):
        ImageFolderDomains(imagefolders.root, ["photos"], split_dirs=("train", "holdout"))
    with pytest.raises(KeyError, match="sketch"):
        ImageFolderDomains(imagefolders.root, ["photos"])["sketch"]


@pytest.mark.parametrize("kind", ["zero-byte", "garbage"])
def test_imagefolder_domains_corrupt_image(imagefolders: ImageFolderFixture, kind: str) -> None:
    bad, _ = imagefolders.files[("paintings", "test")][1]
    _corrupt(bad, kind)
    strict = ImageFolderDomains(imagefolders.root, ["paintings"])
    with pytest.raises(DataError) as info:
        strict["paintings"]["test"][1]
    assert str(bad) in str(info.value)

    lenient = ImageFolderDomains(imagefolders.root, ["paintings"], skip_corrupt=True)
    _, label = lenient["paintings"]["test"][1]
    assert label == imagefolders.files[("paintings", "test")][2][1]
    assert lenient["paintings"]["test"].skipped == 1 and lenient.skipped == 1
