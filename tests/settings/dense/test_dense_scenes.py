"""Procedural scenes, the NYUD layout, the dataset reader and joint augmentations."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ftn.settings.dense.nyud import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    JointCompose,
    NYUDMultiTask,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    Resize,
)
from ftn.settings.dense.scenes import (
    CLASS_NAMES,
    FLOOR,
    IGNORE_INDEX,
    generate_scene,
    render_scene,
    sample_scene,
    write_nyud_layout,
)
from ftn.core.errors import ConfigError, DataError


def _rays(h: int, w: int, intr: tuple[float, float, float, float]) -> np.ndarray:
    fx, fy, cx, cy = intr
    jj, ii = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    return np.stack([(jj - cx) / fx, (ii - cy) / fy, np.ones_like(jj)], -1)


def test_scenes_are_deterministic_by_seed() -> None:
    a, b = generate_scene(3, 5, (40, 56)), generate_scene(3, 5, (40, 56))
    for key in ("image", "semseg", "depth", "normals", "edge"):
        assert np.array_equal(getattr(a, key), getattr(b, key)), key
    c = generate_scene(3, 6, (40, 56))
    assert not np.array_equal(a.depth, c.depth)
    assert a.image.shape == (40, 56, 3) and a.image.dtype == np.uint8
    assert a.normals.shape == (40, 56, 3) and a.normals.dtype == np.float32
    assert a.depth.dtype == np.float32 and a.edge.dtype == np.float32
    with pytest.raises(ConfigError):
        generate_scene(0, 0, (1, 5))


@pytest.mark.parametrize("index", range(8))
def test_labels_depth_and_normals_agree(index: int) -> None:
    rng = np.random.default_rng([11, index])
    spec = sample_scene(rng)
    s = render_scene(spec, (48, 64))
    valid = s.semseg != IGNORE_INDEX
    assert valid.mean() > 0.5
    # Void pixels are void in every map; valid ones have positive depth and unit normals.
    assert np.all((s.depth > 0) == valid)
    assert np.all(np.linalg.norm(s.normals, axis=-1)[~valid] == 0)
    assert np.allclose(np.linalg.norm(s.normals, axis=-1)[valid], 1.0, atol=1e-5)
    assert set(np.unique(s.semseg[valid])) <= set(range(len(CLASS_NAMES)))
    # Normals face the camera: n · ray < 0 for every visible surface.
    rays = _rays(48, 64, s.intrinsics)
    assert np.all(np.einsum("hwc,hwc->hw", s.normals, rays)[valid] < 0)
    # Floor: normal (0, -cos p, -sin p) in OpenCV camera axes (up in the image, towards the
    # camera), and every floor point X = depth · ray lies on the plane n · X = -camera height.
    floor = s.semseg == FLOOR
    assert floor.any()
    n_floor = np.array([0.0, -math.cos(spec.pitch), -math.sin(spec.pitch)])
    assert np.allclose(s.normals[floor], n_floor, atol=1e-5)
    points = s.depth[..., None] * rays
    assert np.allclose(points[floor] @ n_floor, -spec.camera_position[1], atol=1e-4)
    # Edges: {0, 1}, and every horizontal label change has an edge on one side of it.
    assert set(np.unique(s.edge)) <= {0.0, 1.0}
    change = s.semseg[:, 1:] != s.semseg[:, :-1]
    assert np.all((s.edge[:, 1:] + s.edge[:, :-1])[change] >= 1)
    assert 0.01 < s.edge.mean() < 0.5


def test_rendering_is_deterministic_and_reports_its_speed(capsys: pytest.CaptureFixture[str]) -> None:
    """Each scene depends only on (seed, index); the render rate is printed for the record and
    must not collapse (a loose floor, safe on a loaded machine)."""
    for size, n in ((64, 60), (128, 20)):
        t = time.perf_counter()
        scenes = [generate_scene(0, i, size) for i in range(n)]
        rate = n / (time.perf_counter() - t)
        with capsys.disabled():
            print(f"\n[dense scenes] {size}x{size}: {rate:.0f} scenes/s (render only, 1 process)")
        assert rate > 0.5
        again = generate_scene(0, n - 1, size)  # alone, after the others: the same scene
        assert np.array_equal(again.image, scenes[-1].image) and np.array_equal(again.depth, scenes[-1].depth)
        assert not np.array_equal(scenes[0].image, scenes[1].image)


# --------------------------------------------------------------------------------------------
# Layout + dataset


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_nyud_layout(tmp_path_factory.mktemp("nyud"), n_train=6, n_val=3, size=(40, 48), seed=7, workers=2)


def test_layout_files_and_determinism_across_workers(layout: Path, tmp_path: Path) -> None:
    ids = (layout / "gt_sets" / "train.txt").read_text().split()
    assert ids == [f"{i:06d}" for i in range(6)]
    assert (layout / "gt_sets" / "val.txt").read_text().split() == ["000006", "000007", "000008"]
    meta = json.loads((layout / "classes.json").read_text())
    assert meta["classes"] == list(CLASS_NAMES) and meta["ignore_index"] == 255
    for sub, ext in (("images", "jpg"), ("segmentation", "png"), ("depth", "npy"), ("normals", "npy"), ("edge", "npy")):
        assert len(list((layout / sub).glob(f"*.{ext}"))) == 9
    assert np.load(layout / "normals" / "000000.npy").shape == (40, 48, 3)
    single = write_nyud_layout(tmp_path, 6, 3, size=(40, 48), seed=7, workers=1)
    for sub in ("depth", "normals", "edge"):
        assert np.array_equal(np.load(layout / sub / "000004.npy"), np.load(single / sub / "000004.npy"))


def test_dataset_reads_layout_exactly(layout: Path) -> None:
    ds = NYUDMultiTask(layout, "val")
    assert len(ds) == 3
    sample = ds[1]
    ref = generate_scene(7, 7, (40, 48))  # val item 1 is scene 7
    assert sample["meta"]["id"] == "000007"
    assert sample["image"].shape == (3, 40, 48) and sample["image"].dtype == torch.float32
    assert sample["semseg"].dtype == torch.int64 and torch.equal(sample["semseg"], torch.from_numpy(ref.semseg).long())
    assert torch.equal(sample["depth"][0], torch.from_numpy(ref.depth))
    assert torch.equal(sample["normals"], torch.from_numpy(ref.normals).permute(2, 0, 1))
    assert torch.equal(sample["edge"][0], torch.from_numpy(ref.edge))
    # ImageNet normalisation of a JPEG (quality 95) of the rendered image.
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (sample["image"] * std + mean) * 255
    assert (rgb - torch.from_numpy(ref.image).permute(2, 0, 1).float()).abs().mean() < 4.0

    only = NYUDMultiTask(layout, "train", tasks=("depth",))[0]
    assert set(only) == {"image", "depth", "meta"}
    with pytest.raises(ConfigError):
        NYUDMultiTask(layout, "train", tasks=("semseg", "saliency"))


def test_real_nyud_label_convention(layout: Path, tmp_path: Path) -> None:
    # Without classes.json the folder is taken for real NYUD: PNG 0 = void, 1..40 -> 0..39.
    import shutil

    root = tmp_path / "real"
    shutil.copytree(layout, root)
    (root / "classes.json").unlink()
    raw = NYUDMultiTask(layout, "train", tasks=("semseg",))[0]["semseg"]
    real = NYUDMultiTask(root, "train", tasks=("semseg",))[0]["semseg"]
    assert torch.equal(real, torch.where(raw == 0, 255, raw - 1))


def test_dataset_errors_name_the_file(layout: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="test.txt"):
        NYUDMultiTask(layout, "test")
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(layout, root)
    (root / "depth" / "000002.npy").unlink()
    with pytest.raises(DataError, match="000002.npy"):
        NYUDMultiTask(root, "train")
    NYUDMultiTask(root, "train", tasks=("semseg",))  # depth not requested: fine
    (root / "images" / "000001.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    ds = NYUDMultiTask(root, "train", tasks=("semseg",))
    with pytest.raises(DataError, match="000001.jpg"):
        ds[1]
    np.save(root / "normals" / "000003.npy", np.zeros((40, 48), np.float32))
    with pytest.raises(DataError, match="000003.npy"):
        NYUDMultiTask(root, "train", tasks=("normals",))[3]


# --------------------------------------------------------------------------------------------
# Joint augmentations


def test_flip_negates_normal_x_and_keeps_alignment(layout: Path) -> None:
    ds = NYUDMultiTask(layout, "train", normalize=False)
    plain = ds[2]
    ds.transform = RandomHorizontalFlip(p=1.0)
    flipped = ds[2]
    for key in ("image", "semseg", "depth", "edge"):
        assert torch.equal(flipped[key], plain[key].flip(-1)), key
    n0, n1 = plain["normals"], flipped["normals"]
    assert torch.equal(n1[0], -n0[0].flip(-1))
    assert torch.equal(n1[1:], n0[1:].flip(-1))
    # Geometric alignment: the mirrored image's rays have x negated about the principal point,
    # so the flipped normals must still face the camera (n · ray < 0) wherever they are valid.
    ref = generate_scene(7, 2, (40, 48))
    rays = torch.from_numpy(_rays(40, 48, ref.intrinsics)).permute(2, 0, 1).float()
    valid = flipped["depth"][0] > 0
    assert bool(((n1 * rays).sum(0)[valid] < 0).all())


def test_scale_and_crop_keep_labels_aligned(layout: Path) -> None:
    ds = NYUDMultiTask(layout, "train", normalize=False)
    plain = ds[0]
    ds.transform = RandomScale((2.0, 2.0))
    big = ds[0]

    def up(x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(2, -1).repeat_interleave(2, -2)

    for key in ("semseg", "depth", "normals", "edge"):  # nearest: an exact 2× replication
        assert torch.equal(big[key], up(plain[key])), key
    assert big["image"].shape == (3, 80, 96)

    gen = torch.Generator().manual_seed(0)
    aug = JointCompose([RandomScale((0.5, 2.0), normals_mode="bilinear", generator=gen),
                        RandomCrop((56, 64), generator=gen), RandomHorizontalFlip(generator=gen)])
    ds.transform = aug
    for i in range(len(ds)):
        s = ds[i]
        assert all(s[k].shape[-2:] == (56, 64) for k in ("image", "semseg", "depth", "normals", "edge"))
        labels = set(s["semseg"].unique().tolist())
        assert labels <= set(range(len(CLASS_NAMES))) | {255}  # nearest: no blended labels
        norm = s["normals"].norm(dim=0)
        assert bool(((norm - 1).abs()[norm > 0] < 1e-5).all())  # renormalised after bilinear
        assert bool((s["depth"] >= 0).all())

    ds.transform = RandomCrop((50, 60), generator=torch.Generator().manual_seed(1))
    s = ds[0]  # 40×48 sample: padded at the bottom/right with the "no information" values
    assert bool((s["semseg"][40:] == 255).all()) and bool((s["edge"][0, :, 48:] == 255).all())
    assert bool((s["depth"][0, 40:] == 0).all()) and bool((s["normals"][:, :, 48:] == 0).all())
    assert torch.allclose(s["image"][:, 45, 55], torch.tensor(IMAGENET_MEAN))

    ds.transform = Resize((20, 24))
    assert ds[0]["semseg"].shape == (20, 24)
