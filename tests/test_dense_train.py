"""Dense training harness: the paper config on a tiny NYUD-layout fixture, what each method trains,
FTN task isolation and merging (CPU, random weights, no download)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ftn.dense import write_nyud_layout
from ftn.dense.model import MultiTaskNet, SingleTaskNet, build_encoder, count_parameters
from ftn.dense.train import (
    DENSE_METHODS,
    build_datasets,
    build_ftn,
    load_dense_config,
    make_head,
    run_dense,
    stored_parameters,
    train_dense_from_config,
    train_ftn_task,
    train_multi_task,
    train_single_task,
)
from ftn.errors import ConfigError

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "nyud_resnet18_r30.yaml"


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # Small tensors on a shared 2-core machine: one thread avoids OpenMP barrier stalls.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nyud") / "data"
    return write_nyud_layout(root, n_train=4, n_val=2, size=(32, 48), seed=0, workers=1)


def _tiny(scenes: Path, tmp: Path, *extra: str):
    """A small MobileNetV2 (random) setup with narrow decoders, 2 steps per task."""
    return load_dense_config(None, [
        f"data.root={scenes}", "data.crop=[32,48]", "data.batch_size=2", "data.eval_batch_size=2",
        "model.backbone=mobilenet_v2", "model.pretrained=false", "model.aspp_channels=16",
        "model.low_channels=8", "model.decoder_channels=16", "method.rank=4", "train.max_steps=2",
        "train.device=cpu", "train.recalibrate_batches=2", f"output_dir={tmp}", "train.save_adapters=false",
        *extra])


def test_paper_config_loads_with_the_rcm_recipe() -> None:
    cfg = load_dense_config(CONFIG)
    assert (cfg.model.backbone, cfg.model.output_stride, cfg.method.rank) == ("resnet18", 16, 30)
    t = cfg.train
    assert (t.optimizer, t.lr, t.momentum, t.weight_decay, t.schedule) == ("sgd", 0.005, 0.9, 1e-4, "poly")
    assert (cfg.data.batch_size, cfg.data.crop, cfg.data.scale_min, cfg.data.scale_max, cfg.data.flip) == \
        (8, [425, 560], 0.5, 2.0, True)
    assert cfg.data.tasks == ["semseg", "depth", "normals", "edge"]


def test_config_errors_name_the_closest_key() -> None:
    with pytest.raises(ConfigError, match="did you mean 'train.lr'"):
        load_dense_config(CONFIG, ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match="method.name"):
        load_dense_config(CONFIG, ["method.name=ftm"])
    with pytest.raises(ConfigError, match="batch_size"):
        load_dense_config(CONFIG, ["data.batch_size=1"])


def test_paper_config_runs_two_steps_on_a_fixture(scenes: Path, tmp_path: Path) -> None:
    results = train_dense_from_config(CONFIG, [
        f"data.root={scenes}", "model.pretrained=false", "train.max_steps=2", "data.crop=[32,48]",
        "data.batch_size=2", "data.num_workers=0", "train.device=cpu", "train.recalibrate_batches=1",
        f"output_dir={tmp_path}"], progress=False)
    r = results["methods"]["ftn"]
    assert r["steps"] == {"semseg": 2, "depth": 2, "normals": 2, "edge": 2}
    for task, metrics in r["metrics"].items():
        assert all(math.isfinite(v) for v in metrics.values()), (task, metrics)
    p = r["parameters"]
    assert p["shared"] == 11_176_512  # ResNet-18 convs + BN affine, fc removed
    assert p["total"] == p["shared"] + sum(p[f"task:{t}"] for t in results["tasks"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["methods"]["ftn"]["parameters"] == p
    assert sorted(f.name for f in (tmp_path / "ftn").iterdir()) == [
        "depth.safetensors", "edge.safetensors", "normals.safetensors", "semseg.safetensors"]


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_ftn_trains_only_its_task_and_merges(scenes: Path, tmp_path: Path) -> None:
    cfg = _tiny(scenes, tmp_path)
    data = build_datasets(cfg)
    model = build_ftn(cfg, ["semseg", "depth"], data.num_classes)
    fingerprint = model.backbone_fingerprint()
    x = torch.stack([data.val[i]["image"] for i in range(2)])
    model.eval()
    with torch.no_grad():
        semseg_before = model(x, task="semseg").clone()
        depth_before = model(x, task="depth").clone()
    before = _state(model)

    train_ftn_task(model, "depth", cfg, data, progress=False)

    assert model.backbone_fingerprint() == fingerprint  # frozen encoder unchanged
    after = _state(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".depth." in k or k.startswith("heads.depth.") for k in changed), sorted(changed)[:5]
    assert any(k.startswith("heads.depth.") for k in changed)
    assert any(".tasks.depth.factors" in k or "tasks.depth.factors" in k for k in changed)
    assert all(not p.requires_grad for p in model.frozen_tensors().values() if isinstance(p, torch.nn.Parameter))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, task="semseg"), semseg_before)  # other tasks: bit-identical
        depth_after = model(x, task="depth")
        assert not torch.equal(depth_after, depth_before)
        merged = model.merge("depth").eval()  # plain PyTorch, W + ΔW folded in
        assert torch.allclose(merged(x), depth_after, atol=1e-5, rtol=1e-4)
    # Normals heads return unit vectors.
    normals = build_ftn(cfg, ["normals"], data.num_classes).eval()
    with torch.no_grad():
        n = normals(x, task="normals")
    assert n.shape == (2, 3, 32, 48) and torch.allclose(n.norm(dim=1), torch.ones(2, 32, 48), atol=1e-5)


def test_baselines_train_their_own_parameters(scenes: Path, tmp_path: Path) -> None:
    cfg = _tiny(scenes, tmp_path)
    data = build_datasets(cfg)
    source = build_encoder("mobilenet_v2", pretrained=False)
    source_state = _state(source)
    import copy

    net, info = train_single_task(cfg, "edge", data, encoder=copy.deepcopy(source), progress=False)
    assert isinstance(net, SingleTaskNet) and info["steps"] == 2
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in source_state.items())  # the source is a copy
    assert all(p.requires_grad for p in net.parameters())
    moved = [k for k, v in net.encoder.state_dict().items() if not torch.equal(v, source_state[k])]
    assert moved  # full fine-tuning moves the encoder
    with torch.no_grad():
        assert net.eval()(torch.zeros(2, 3, 32, 48)).shape == (2, 1, 32, 48)

    mtl, info = train_multi_task(cfg, data, encoder=copy.deepcopy(source), progress=False)
    assert isinstance(mtl, MultiTaskNet) and info["steps"] == 2
    for t in mtl.tasks:  # every decoder moved away from its (seeded, reproducible) initialisation
        init = make_head(cfg, source, t, data.num_classes).state_dict()
        assert any(not torch.equal(v, init[k]) for k, v in mtl.heads[t].state_dict().items()), t
    assert any(not torch.equal(v, source_state[k]) for k, v in mtl.encoder.state_dict().items())
    with torch.no_grad():
        out = mtl.eval()(torch.zeros(2, 3, 32, 48))
    assert {t: tuple(v.shape) for t, v in out.items()} == {
        "semseg": (2, 7, 32, 48), "depth": (2, 1, 32, 48), "normals": (2, 3, 32, 48), "edge": (2, 1, 32, 48)}
    p = stored_parameters("mtl", {"all": info}, data.tasks)
    assert p["total"] == count_parameters(mtl) == p["shared"] + sum(count_parameters(h) for h in mtl.heads.values())


def test_run_dense_all_methods_delta_m_and_parameters(scenes: Path, tmp_path: Path) -> None:
    cfg = _tiny(scenes, tmp_path, "method.name=all", "data.tasks=[semseg,depth]", "train.max_steps=1")
    results = run_dense(cfg, progress=False, preview=(0,))
    assert list(results["methods"]) == list(DENSE_METHODS)
    single, mtl, ftn = (results["methods"][m] for m in DENSE_METHODS)
    assert single["delta_m"] == 0.0
    for r in (mtl, ftn):
        base = single["metrics"]
        expect = ((r["metrics"]["semseg"]["mIoU"] - base["semseg"]["mIoU"]) / base["semseg"]["mIoU"]
                  - (r["metrics"]["depth"]["rmse"] - base["depth"]["rmse"]) / base["depth"]["rmse"]) / 2
        assert r["delta_m"] == pytest.approx(expect)
    enc = count_parameters(build_encoder("mobilenet_v2", pretrained=False))
    dec = {t: single["parameters"][f"task:{t}"] - enc for t in ("semseg", "depth")}
    assert single["parameters"]["total"] == 2 * enc + sum(dec.values())
    assert mtl["parameters"]["total"] == enc + sum(dec.values())  # same decoders, one encoder
    assert ftn["parameters"]["shared"] == enc
    assert all(ftn["parameters"][f"task:{t}"] > dec[t] for t in dec)  # decoder + ΔW + norms
    assert ftn["parameters"]["total"] < single["parameters"]["total"]
    previews = results["_previews"]
    assert previews["ftn"]["semseg"].shape == (1, 7, 32, 48)
