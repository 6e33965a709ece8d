"""TAPS and partial unfreezing as methods: the penalty through the engine, `ftn train` on the
embedded fixture (2 steps) with `method.name=taps` and `method.ftn.unfreeze`, and `ftn demo`."""

import json

import pytest
import torch

from ftn import ConfigError
from ftn.adapters import read_adapter
from ftn.cli import main
from ftn.training.config import TrainConfig, load_config
from ftn.training.methods import GatedDelta, TAPSConfig, last_block_patterns

from test_train_configs import EMBEDDED, TINY
from tiny import run, tiny_method

SGD = dict(optimizer="sgd", momentum=0.0, lr=0.05, grad_clip=None, weight_decay=0.0, max_steps=20)


def gates(method):
    return {ln: layer.tasks["d"] for ln, layer in method.model.adapted_layers().items()
            if isinstance(layer.tasks["d"], GatedDelta)}


def test_penalty_pushes_scores_down_and_switches_the_largest_layers_off(tmp_path):
    free = tiny_method("taps", taps=TAPSConfig(penalty=0.0))
    run(tmp_path / "free", method=free, train=TrainConfig(**SGD))
    assert all(g.active for g in gates(free).values())  # no penalty: every layer stays on

    method = tiny_method("taps", taps=TAPSConfig(penalty=1.0))
    task = method.add_task("d", torch.nn.Linear(16, 3))
    assert task.regularizer is not None and float(task.regularizer().detach()) == pytest.approx(1.0)  # all on at start (s₀ = 2τ)
    start = {ln: float(g.score.detach()) for ln, g in gates(method).items()}
    run(tmp_path / "taps", method=method, train=TrainConfig(**SGD))
    end = {ln: float(g.score.detach()) for ln, g in gates(method).items()}
    assert all(end[ln] < start[ln] for ln in start)
    on = {ln for ln, g in gates(method).items() if g.active}
    assert "same" not in on  # the largest layer (576 of 1,568 weights) goes first
    assert on and len(on) < len(start)

    info = method.info()["tasks"]["d"]
    sizes = {ln: g.weight.numel() for ln, g in gates(method).items()}
    assert info["adapted_layers"] == len(on) and info["gated_layers"] == len(start)
    assert info["adapted_parameters"] == sum(sizes[ln] + 1 for ln in on)
    report = method.model.parameter_report().tasks["d"]
    assert report.delta == info["delta_parameters"] == info["adapted_parameters"] and report.layers == len(on)
    assert 0 < float(task.regularizer().detach()) < 1


def test_taps_config_is_checked():
    with pytest.raises(ConfigError, match="tau"):
        load_config(None, ["method.name=taps", "method.taps.tau=0"])
    cfg = load_config(None, ["method.name=taps", "method.taps.penalty=0.5", "method.ftn.unfreeze=[layer4.*]"])
    assert cfg.method.taps.penalty == 0.5 and cfg.method.ftn.unfreeze == ["layer4.*"]


def test_ftn_unfreeze_defaults_to_the_last_block():
    method = tiny_method("ftn_unfreeze")
    assert last_block_patterns(method.model) == ["fc", "fc.*"]  # SmallCNN: its last layer
    method.add_task("d", torch.nn.Linear(16, 3))
    assert method.info()["unfreeze"] == ["fc", "fc.*"]
    assert method.model.parameter_report().tasks["d"].dense == 16 * 16


def _train(tmp_path, *overrides):
    args = ["--config", str(EMBEDDED), *TINY[:-1], "data.domains=[mnist,optdigits]", f"output_dir={tmp_path}",
            *overrides]
    assert main(["train", "--no-progress", *args, "train.max_steps=2"]) == 0
    return args, json.loads((tmp_path / "results.json").read_text())


def test_ftn_train_with_taps_runs_two_steps_and_evaluates_from_its_adapters(tmp_path, capsys):
    args, results = _train(tmp_path, "method.name=taps", "method.taps.penalty=0.5")
    assert results["method"] == "taps" and all(r["steps"] == 2 for r in results["tasks"].values())
    info = results["method_info"]
    assert info["tau"] == 0.1 and info["penalty"] == 0.5 and set(info["tasks"]) == {"mnist", "optdigits"}
    for task, t in info["tasks"].items():
        assert 0 < t["adapted_layers"] <= t["gated_layers"]
        assert results["parameters"]["per_task"][task] > t["delta_parameters"] == t["adapted_parameters"]
        tensors, meta = read_adapter(tmp_path / "adapters" / f"{task}.safetensors")
        stored = sum(v.numel() for k, v in tensors.items() if k.startswith("delta."))
        assert stored == t["adapted_parameters"]
    capsys.readouterr()
    assert main(["eval", *args, "--adapters", str(tmp_path / "adapters")]) == 0
    out = capsys.readouterr().out
    for task, r in results["tasks"].items():
        assert f"{task:<16} test top-1 {r['test']['acc']:.2f}%" in out


def test_ftn_train_with_unfreeze_runs_two_steps_and_stores_the_dense_layer(tmp_path):
    _, results = _train(tmp_path, "method.ftn.unfreeze=[\"6\"]")
    assert results["method"] == "ftn" and results["method_info"]["unfreeze"] == ["6"]
    tensors, meta = read_adapter(tmp_path / "adapters" / "mnist.safetensors")
    assert meta["layers"]["6"]["kind"] == "dense" and "delta.6.weight" in tensors and "delta.0.0" in tensors
    assert tensors["delta.6.weight"].abs().sum() > 0  # trained


@pytest.mark.slow
def test_demo_runs_taps_and_partial_unfreezing(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(out), "--no-progress", "train.max_steps=2", "data.test_limit=32",
                 "data.val_limit=32", "--methods", "taps", "ftn_unfreeze"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"taps", "ftn_unfreeze"}
    assert results["methods"]["ftn_unfreeze"]["method_info"]["unfreeze"] == ["features.18", "features.18.*"]
    assert set(results["methods"]["taps"]["method_info"]["tasks"]) == {"mnist", "fashion", "animal", "optdigits"}
    table = (out / "table.md").read_text()
    assert "| TAPS |" in table and "| FTN + last block unfrozen |" in table


def test_score_lr_gives_the_scores_their_own_adamw_group_so_gates_can_close_in_a_short_run(tmp_path):
    """Under AdamW a score moves by about its learning rate per step: at a fine-tuning rate no gate
    closes in a short run; with `method.taps.score_lr` the scores get their own rate and do."""
    adamw = dict(optimizer="adamw", lr=1e-3, grad_clip=None, weight_decay=0.0, max_steps=10)
    slow = tiny_method("taps", taps=TAPSConfig(penalty=1.0))
    run(tmp_path / "slow", method=slow, train=TrainConfig(**adamw))
    assert all(g.active for g in gates(slow).values())  # 10 steps × ~1e-3 cannot reach τ from 2τ

    fast = tiny_method("taps", taps=TAPSConfig(penalty=1.0, score_lr=0.05))
    task = fast.add_task("d", torch.nn.Linear(16, 3))
    scores = {id(g.score) for g in gates(fast).values()}
    assert [{id(p) for p in g["params"]} for g in task.extra_groups] == [scores]
    assert not scores & {id(p) for p in task.body_params} and scores <= {id(p) for p in task.parameters}
    run(tmp_path / "fast", method=fast, train=TrainConfig(**adamw))  # trains the task "d" added above
    assert not all(g.active for g in gates(fast).values())  # the penalty closed some gates
    assert fast.info()["score_lr"] == 0.05
    with pytest.raises(ConfigError, match="score_lr"):
        TAPSConfig(score_lr=0.0)
