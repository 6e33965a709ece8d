"""The dense setting: what each method trains on the dense heads, FTN task isolation and merging,
the joint multi-task model, Δm and parameter accounting (CPU, random weights, no download)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ftn.settings.dense.setting import JOINT, compare
from ftn.core.errors import ConfigError
from ftn.training.engine import train_task
from ftn.training.runner import build, run_experiments

from helpers import tiny_dense_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _train(cfg, setting, method, name, tmp):
    data = setting.data(name)
    task = method.tasks[name] if name in method.tasks else method.add_task(name, setting.head(data))
    return task, train_task(task, data, cfg.train, cfg.data, tmp / name, progress=False)


def test_ftn_trains_only_its_task_and_merges(scenes: Path, tmp_path: Path) -> None:
    cfg = tiny_dense_config(scenes, tmp_path)
    setting, method = build(cfg, torch.device("cpu"))
    model = method.model
    for t in ("semseg", "depth"):
        method.add_task(t, setting.head(setting.data(t)))
    fingerprint = model.backbone_fingerprint()
    data = setting.data("depth")
    assert len(data.recal) == len(data.train) and data.recal.transform is None  # un-augmented, same scenes
    x = torch.stack([data.test[i]["image"] for i in range(2)])
    model.eval()
    with torch.no_grad():
        semseg_before = model(x, task="semseg")["semseg"].clone()
        depth_before = model(x, task="depth")["depth"].clone()
    before = _state(model)

    _train(cfg, setting, method, "depth", tmp_path)

    assert model.backbone_fingerprint() == fingerprint  # frozen encoder unchanged
    after = _state(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".depth." in k or k.startswith("heads.depth.") for k in changed), sorted(changed)[:5]
    assert any(k.startswith("heads.depth.") for k in changed)
    assert any("tasks.depth.factors" in k for k in changed)
    assert all(not p.requires_grad for p in model.frozen_tensors().values() if isinstance(p, torch.nn.Parameter))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, task="semseg")["semseg"], semseg_before)  # other tasks: bit-identical
        depth_after = model(x, task="depth")["depth"]
        assert not torch.equal(depth_after, depth_before)
        merged = model.merge("depth").eval()  # plain PyTorch, W + ΔW folded in
        assert torch.allclose(merged(x)["depth"], depth_after, atol=1e-5, rtol=1e-4)
    # Normals heads return unit vectors.
    method.add_task("normals", setting.head(setting.data("normals")))
    with torch.no_grad():
        n = model.eval()(x, task="normals")["normals"]
    assert n.shape == (2, 3, 32, 48) and torch.allclose(n.norm(dim=1), torch.ones(2, 32, 48), atol=1e-5)


def test_full_fine_tuning_per_task_and_joint(scenes: Path, tmp_path: Path) -> None:
    """``full``: a fine-tuned encoder copy per task; with ``data.joint`` one shared encoder and
    every decoder, trained on the weighted sum of the task losses."""
    cfg = tiny_dense_config(scenes, tmp_path, "method.name=full")
    setting, method = build(cfg, torch.device("cpu"))
    source = _state(method.pretrained)
    task, result = _train(cfg, setting, method, "edge", tmp_path)
    assert result.steps == 2 and all(p.requires_grad for p in task.module.parameters())
    assert all(torch.equal(v, method.pretrained.state_dict()[k]) for k, v in source.items())  # copied, not moved
    moved = [k for k, v in task.module.backbone.state_dict().items() if not torch.equal(v, source[k])]
    assert moved  # full fine-tuning moves the encoder
    with torch.no_grad():
        assert task.module.eval()(torch.zeros(2, 3, 32, 48))["edge"].shape == (2, 1, 32, 48)

    joint = tiny_dense_config(scenes, tmp_path / "joint", "method.name=full", "data.joint=true")
    setting, method = build(joint, torch.device("cpu"))
    assert setting.tasks() == [JOINT]
    init = setting.head(setting.data(JOINT)).state_dict()  # seeded: the same decoders every time
    task, result = _train(joint, setting, method, JOINT, tmp_path / "joint")
    assert result.steps == 2 and set(result.test) >= {"semseg/mIoU", "depth/rmse", "normals/mean_angle", "edge/odsF"}
    heads = task.module.head
    for t in ("semseg", "depth", "normals", "edge"):  # every decoder moved away from its initialisation
        assert any(not torch.equal(v, init[f"{t}.{k}"]) for k, v in heads[t].state_dict().items()), t
    with torch.no_grad():
        out = task.module.eval()(torch.zeros(2, 3, 32, 48))
    assert {t: tuple(v.shape) for t, v in out.items()} == {
        "semseg": (2, 7, 32, 48), "depth": (2, 1, 32, 48), "normals": (2, 3, 32, 48), "edge": (2, 1, 32, 48)}
    assert method.stored_parameters() == sum(p.numel() for p in task.module.parameters())


def test_lora_trains_the_dense_decoders_and_saves_their_buffers(scenes: Path, tmp_path: Path) -> None:
    """PEFT refuses a ModuleDict in ``modules_to_save``: the dense head (one decoder per task) is
    left trainable instead, and its BatchNorm statistics go into the task's state."""
    pytest.importorskip("peft")
    cfg = tiny_dense_config(scenes, tmp_path, "method.name=lora")
    setting, method = build(cfg, torch.device("cpu"))
    task, result = _train(cfg, setting, method, "semseg", tmp_path)
    assert result.steps == 2 and task.head_params and all(p.requires_grad for p in task.head_params)
    backbone = {n for n, p in task.module.named_parameters() if p.requires_grad and ".head." not in n}
    assert backbone and all("lora_" in n or "modules_to_save" in n for n in backbone)
    state = task.state_dict()
    assert any(".head." in k and k.endswith("running_mean") for k in state)  # decoder BN statistics
    head = task.module.get_base_model().head
    assert any(not torch.equal(v, head.state_dict()[k]) for k, v in setting.head(setting.data("semseg")).state_dict().items()
               if v.is_floating_point())  # the decoder moved


def test_three_methods_delta_m_and_parameters(scenes: Path, tmp_path: Path) -> None:
    variants = {"single": ["method.name=full"], "mtl": ["method.name=full", "data.joint=true"],
                "ftn": ["method.name=ftn"]}
    cfgs = [tiny_dense_config(scenes, tmp_path / v, "data.tasks=[semseg,depth]", "train.max_steps=1", *o)
            for v, o in variants.items()]
    runs = compare(dict(zip(variants, run_experiments(cfgs, progress=False))), baseline="single")
    single, mtl, ftn = (runs[v] for v in variants)
    assert single["delta_m"] == 0.0
    for r in (mtl, ftn):
        base = single["metrics"]
        assert all(math.isfinite(v) for m in r["metrics"].values() for v in m.values())
        expect = ((r["metrics"]["semseg"]["mIoU"] - base["semseg"]["mIoU"]) / base["semseg"]["mIoU"]
                  - (r["metrics"]["depth"]["rmse"] - base["depth"]["rmse"]) / base["depth"]["rmse"]) / 2
        assert r["delta_m"] == pytest.approx(expect)
    enc = ftn["parameters"]["shared"]
    dec = {t: single["parameters"]["per_task"][t] - enc for t in ("semseg", "depth")}
    assert single["stored_parameters"] == 2 * enc + sum(dec.values())
    assert mtl["stored_parameters"] == enc + sum(dec.values())  # same decoders, one encoder
    assert all(ftn["parameters"]["per_task"][t] > dec[t] for t in dec)  # decoder + ΔW + norms
    assert ftn["stored_parameters"] < single["stored_parameters"]


def test_recompute_depthwise_option_trains_identically(scenes: Path, tmp_path: Path) -> None:
    # train.recompute_depthwise changes what is kept for the backward, not the result.
    states = []
    for flag in ("false", "true"):
        cfg = tiny_dense_config(scenes, tmp_path / flag, f"train.recompute_depthwise={flag}")
        setting, method = build(cfg, torch.device("cpu"))
        layers = [layer for layer in method.model.adapted_layers().values() if layer.recompute_output]
        assert len(layers) == (17 if flag == "true" else 0)  # MobileNetV2's depthwise convs
        task, _ = _train(cfg, setting, method, "semseg", tmp_path / flag)
        states.append(task.state_dict())
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_recompute_depthwise_needs_an_ftn_method(scenes: Path, tmp_path: Path) -> None:
    cfg = tiny_dense_config(scenes, tmp_path, "train.recompute_depthwise=true", "method.name=lora")
    with pytest.raises(ConfigError, match="recompute_depthwise applies to FTN methods"):
        build(cfg, torch.device("cpu"))


def test_channels_last_option_trains_and_its_files_load_in_the_default_layout(scenes: Path, tmp_path: Path) -> None:
    cfg = tiny_dense_config(scenes, tmp_path / "cl", "train.channels_last=true")
    setting, method = build(cfg, torch.device("cpu"))
    convs = [layer.base for layer in method.model.adapted_layers().values()]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    task, _ = _train(cfg, setting, method, "semseg", tmp_path / "cl")
    (tmp_path / "files").mkdir()
    path = method.save_task("semseg", tmp_path / "files")
    # The same task loaded into a model built in the default layout computes the same outputs.
    plain_cfg = tiny_dense_config(scenes, tmp_path / "plain")
    _, plain = build(plain_cfg, torch.device("cpu"))
    plain.load_task("semseg", setting.head(setting.data("semseg")), path)
    x = torch.stack([setting.data("semseg").test[i]["image"] for i in range(2)])
    method.model.eval()
    plain.model.eval()
    layouts = []  # the first adapted conv's output in each model: the layouts really differ
    hooks = [next(iter(m.model.adapted_layers().values())).register_forward_hook(
        lambda mod, i, o: layouts.append(o.is_contiguous(memory_format=torch.channels_last) and not o.is_contiguous()))
        for m in (plain, method)]
    with torch.no_grad():
        got = plain.model(x, task="semseg")["semseg"]
        want = method.model(x, task="semseg")["semseg"]
    for h in hooks:
        h.remove()
    assert layouts == [False, True]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
