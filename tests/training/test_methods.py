"""The method registry: what each method trains, budgets, and a new method in every setting."""

import pytest
import torch

from ftn import ConfigError
from ftn.training.config import TrainConfig
from ftn.training.methods import (METHODS, LoRAConfig, delta_used, ftn_delta_budget, lora_delta_params,
                                  matched_lora_rank, method_class)

from helpers import SmallCNN, randomize_norms, tensor_hash
from helpers.tiny import bn_head, run, tiny_method


@pytest.mark.parametrize("name", ["ftn", "full", "linear", "norm_head", "lora", "taps", "ftn_unfreeze"])
def test_each_method_trains_only_its_parameters(tmp_path, name):
    method = tiny_method(name)
    task = method.add_task("d", torch.nn.Linear(16, 3))
    expected = {
        "linear": 16 * 3 + 3,
        "full": sum(p.numel() for p in SmallCNN().parameters()) + 16 * 3 + 3,
    }
    if name in expected:
        assert task.num_trainable() == expected[name]
    pretrained_hash = tensor_hash(method.pretrained.state_dict().values()) if name in ("full", "lora") else None
    _, _, result = run(tmp_path, method=method, train=TrainConfig(max_steps=3, lr=1e-2))
    assert result.steps == 3 and result.test is not None
    if pretrained_hash:  # per-task copies leave the shared pretrained backbone alone
        assert tensor_hash(method.pretrained.state_dict().values()) == pretrained_hash
    if name == "linear":  # a linear probe keeps the backbone's BatchNorm statistics frozen
        fresh = randomize_norms(SmallCNN())
        assert torch.equal(method.backbone.bn1.running_mean, fresh.bn1.running_mean)
    assert method.stored_parameters() == method.shared_parameters() + method.task_parameters("d") > 0


def test_saved_task_loads_back_identically(tmp_path):
    """Every method's task file (FTN: an adapter file) restores the task on a fresh method."""
    for name in ("ftn", "full", "lora", "linear", "taps", "ftn_unfreeze"):
        method, task, _ = run(tmp_path / name, method_name=name, train=TrainConfig(max_steps=2, lr=1e-2), head=bn_head)
        path = method.save_task("d", tmp_path / name)
        again = tiny_method(name).load_task("d", bn_head(), path)
        loaded = again.state_dict()
        for k, v in task.state_dict().items():
            if name == "taps" and k not in loaded:  # a closed gate's layer is not stored
                layer = k[len("delta."):].rsplit(".", 1)[0]
                assert not method.gates("d")[layer].active, (name, k)
                continue
            assert torch.equal(v, loaded[k]), (name, k)
        x = torch.randn(4, 3, 16, 16)
        task.eval(), again.eval()
        with torch.no_grad():
            assert torch.equal(task(x), again(x)), name  # the same outputs either way


def test_ftn_info_reports_what_each_task_got():
    """method_info: the configured rank as before, and per task the ΔW and ranks it actually has."""
    method = tiny_method("ftn")
    method.add_task("a", torch.nn.Linear(16, 3))  # the configured rank 2, capped per layer
    layers = method.model.adapted_layers()
    ranks = {n: i % 3 for i, n in enumerate(layers)}  # 0, 1, 2, 0, ...
    method.add_task("b", torch.nn.Linear(16, 3), ranks=ranks)
    info = method.info()
    report = method.model.parameter_report()
    assert info["rank"] == 2 and info["ranks"] == {}
    expected_a = {n: layer.rank("a") for n, layer in layers.items()}
    for task, got in (("a", expected_a), ("b", ranks)):
        entry = info["tasks"][task]
        assert entry["delta_parameters"] == report.tasks[task].delta > 0 and entry["budget"] is None
        counts = {str(r): sum(1 for v in got.values() if v == r) for r in sorted(set(got.values()))}
        assert entry["ranks"] == {"min": min(got.values()), "max": max(got.values()),
                                  "mean": round(sum(got.values()) / len(got), 3), "counts": counts}
    assert delta_used(info) == round((report.tasks["a"].delta + report.tasks["b"].delta) / 2)
    # Norms and head only: rank 0 everywhere; unfrozen layers are counted apart from CP ranks.
    norm_head = tiny_method("norm_head")
    norm_head.add_task("d", torch.nn.Linear(16, 3))
    assert norm_head.info()["tasks"]["d"]["ranks"]["max"] == 0 and delta_used(norm_head.info()) == 0
    unfreeze = tiny_method("ftn_unfreeze")
    unfreeze.add_task("d", torch.nn.Linear(16, 3))
    entry = unfreeze.info()["tasks"]["d"]
    assert entry["ranks"]["dense_layers"] >= 1 and sum(entry["ranks"]["counts"].values()) + entry["ranks"][
        "dense_layers"] == len(unfreeze.model.adapted_layers())
    # Methods that do not report a per-task ΔW, and results written before it was reported.
    lora = tiny_method("lora")
    lora.add_task("d", torch.nn.Linear(16, 3))
    assert delta_used(lora.info()) is None and delta_used({"rank": 8, "ranks": {}}) is None and delta_used({}) is None


def test_lora_rank_matches_ftn_budget():
    backbone = SmallCNN()
    per_rank = lora_delta_params(backbone, 1)
    assert matched_lora_rank(backbone, 3 * per_rank) == 3
    assert matched_lora_rank(backbone, 1) == 1
    before = tensor_hash(backbone.state_dict().values())
    budget = ftn_delta_budget(backbone)  # rank 8 on every conv/linear
    assert budget == ftn_delta_budget(backbone, rank=8) > ftn_delta_budget(backbone, rank=2) > 0
    assert tensor_hash(backbone.state_dict().values()) == before  # the probe works on a copy
    assert tiny_method("lora").lora_rank == matched_lora_rank(SmallCNN(), ftn_delta_budget(SmallCNN(), rank=2))
    given = tiny_method("lora", lora=LoRAConfig(rank=3, alpha=6.0))  # method.lora.rank / alpha
    assert given.info() == {"lora_rank": 3, "lora_alpha": 6.0}
    assert tiny_method("lora", lora=LoRAConfig(rank=3)).info()["lora_alpha"] == 3.0


def test_unknown_and_renamed_method_names():
    with pytest.raises(ConfigError, match=r"method.name must be one of .* \(did you mean 'lora'\?\)"):
        method_class("lorra")
    for old in ("bn_head", "ln_head"):
        with pytest.raises(ConfigError, match=f"method '{old}' is now called 'norm_head': set method.name=norm_head"):
            method_class(old)
    assert "bn_head" not in METHODS


# ----------------------------------------------------------------------------- a new baseline
@pytest.fixture
def bitfit():
    from helpers import bitfit_method  # the baseline in one file (registers "bitfit"); also test_new_method.py

    return bitfit_method.BitFitMethod.name


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["classification", "dense", "text"])
def test_a_new_method_works_in_every_setting(bitfit, setting, tmp_path, capsys):
    from ftn.apps.cli import main

    from helpers.tiny import tiny_overrides

    config, overrides = tiny_overrides(setting, tmp_path)
    args = ["--config", str(config), *overrides, f"method.name={bitfit}", f"output_dir={tmp_path / 'out'}"]
    assert main(["train", "--no-progress", *args]) == 0
    import json

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["method"] == bitfit and results["parameters"]["shared"] > 0
    assert all(r["steps"] == 2 and r["test"] for r in results["tasks"].values())
    capsys.readouterr()
    assert main(["eval", *args, "--adapters", str(tmp_path / "out" / "adapters")]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == len(results["tasks"])
