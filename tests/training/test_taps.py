"""TAPS and partial unfreezing as methods: the penalty through the engine, `ftn train` on the
embedded fixture (2 steps) with `method.name=taps` and `method.ftn.unfreeze`, and `ftn demo`."""

import dataclasses
import json

import pytest
import torch

from ftn import ConfigError
from ftn.core.adapters import read_adapter
from ftn.apps.cli import main
from ftn.training.config import TrainConfig, load_config
from ftn.training.methods import GatedDelta, ProximalScoreSGD, TAPSConfig, last_block_patterns

from helpers.tiny import EMBEDDED, TINY
from helpers.tiny import run, tiny_data, tiny_method


def gates(method):
    return {ln: layer.tasks["d"] for ln, layer in method.model.adapted_layers().items()
            if isinstance(layer.tasks["d"], GatedDelta)}


def _taps_run(tmp_path, penalty, **options):
    """Train TAPS on the tiny task (no validation split: the last epoch is kept) with the default
    TAPS options; returns the method."""
    method = tiny_method("taps", taps=TAPSConfig(penalty=penalty, **options))
    run(tmp_path / f"taps{penalty}", method=method, train=TrainConfig(epochs=3, lr=1e-3),
        data=dataclasses.replace(tiny_data(n=96), val=None))
    return method


def test_layers_on_fall_with_lambda_from_all_to_at_most_half_with_the_default_options(tmp_path):
    """The mechanism: every gate open at λ = 0, the number open non-increasing as λ grows, and at
    most half open at a large λ, with the default score rate (chosen from the schedule)."""
    on = {}
    for penalty in (0.0, 0.03, 0.3, 3.0, 30.0):
        method = _taps_run(tmp_path, penalty)
        on[penalty] = sum(g.active for g in gates(method).values())
        info = method.info()
        assert info["tasks"]["d"]["adapted_layers"] == on[penalty]
        assert info["tasks"]["d"]["score_lr"] == method.score_lrs["d"] > 0
    n = len(gates(method))
    assert on[0.0] == n, on
    values = [on[p] for p in sorted(on)]
    assert values == sorted(values, reverse=True), on
    assert on[30.0] <= n // 2, on


def test_scores_start_just_above_tau_and_the_penalty_closes_the_largest_layers_first_when_weighted(tmp_path):
    method = tiny_method("taps")
    method.add_task("d", torch.nn.Linear(16, 3))
    assert [float(g.score.detach()) for g in gates(method).values()] == pytest.approx([0.15] * len(gates(method)))
    assert method.penalty("d") == pytest.approx(0.15)  # λ = 1 × mean |s|
    weighted = _taps_run(tmp_path, 0.03, weighting="params")
    scores = {ln: float(g.score.detach()) for ln, g in gates(weighted).items()}
    sizes = {ln: g.weight.numel() for ln, g in gates(weighted).items()}
    largest, smallest = max(sizes, key=sizes.get), min(sizes, key=sizes.get)
    assert scores[largest] < scores[smallest]  # pushed λ·n_l/N: the largest layer hardest


def test_the_proximal_step_stops_at_zero_and_a_closed_gate_can_reopen():
    """The L1 step shrinks a score to 0 without overshooting (whatever λ), and a closed gate whose
    layer the task needs (a negative straight-through gradient) opens again."""
    score = torch.nn.Parameter(torch.tensor(0.15))
    opt = ProximalScoreSGD([score], lr=1.0, momentum=0.9, penalty=100.0, weights=[1.0], warmup_steps=1)
    opt.step()  # warm-up step: no penalty, no gradient
    assert float(score.detach()) == pytest.approx(0.15)
    for _ in range(5):
        opt.step()
        assert float(score.detach()) == 0.0  # shrunk to 0, never below
    reopen = ProximalScoreSGD([score], lr=0.01, momentum=0.9, penalty=1.0, weights=[0.1], warmup_steps=0)
    for _ in range(20):
        score.grad = torch.tensor(-1.0)  # opening the gate would lower the task loss
        reopen.step()
    assert float(score.detach()) >= 0.1


def test_a_taps_run_resumes_bit_identical_with_its_scores_optimizer(tmp_path):
    def train(folder, stop=None):
        method = tiny_method("taps", taps=TAPSConfig(penalty=0.3))
        try:
            run(folder, method=method, stop=stop, train=TrainConfig(epochs=2, checkpoint_every=2, lr=1e-3),
                data=dataclasses.replace(tiny_data(n=96), val=None))
        except KeyboardInterrupt:
            method = tiny_method("taps", taps=TAPSConfig(penalty=0.3))
            run(folder, method=method, train=TrainConfig(epochs=2, checkpoint_every=2, lr=1e-3),
                data=dataclasses.replace(tiny_data(n=96), val=None))
        return {ln: g.score.detach().clone() for ln, g in gates(method).items()}

    whole = train(tmp_path / "whole")
    resumed = train(tmp_path / "resumed", stop=5)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


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
    args, results = _train(tmp_path, "method.name=taps", "method.taps.penalty=0.01")
    assert results["method"] == "taps" and all(r["steps"] == 2 for r in results["tasks"].values())
    info = results["method_info"]
    assert info["tau"] == 0.1 and info["penalty"] == 0.01 and set(info["tasks"]) == {"mnist", "optdigits"}
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


def test_score_lr_overrides_the_rate_from_the_schedule(tmp_path):
    method = _taps_run(tmp_path, 0.3, score_lr=1e-6)
    assert method.score_lrs["d"] == 1e-6 and method.info()["score_lr"] == 1e-6
    assert all(g.active for g in gates(method).values())  # too slow to reach τ in 36 steps
    for bad in (dict(score_lr=0.0), dict(weighting="size"), dict(warmup=1.0), dict(init_score=0.05)):
        with pytest.raises(ConfigError):
            TAPSConfig(**bad)


def _reference_prox_step(scores, bufs, grads, lr, mu, penalty, weights, step, warmup):
    """The per-score arithmetic the optimizer documents, one score at a time."""
    for i, (s, g, w) in enumerate(zip(scores, grads, weights)):
        bufs[i] = g.clone() if bufs[i] is None else bufs[i] * mu + g
        s -= lr * bufs[i]
        if step > warmup and penalty:
            shrink = lr * penalty * w / (1 - mu)
            s.copy_(s.sign() * (s.abs() - shrink).clamp_min(0))


def test_the_score_optimizer_is_the_per_score_arithmetic_in_a_fixed_number_of_ops():
    from ftn.core.opcount import count_ops
    from ftn.training.methods import ProximalScoreSGD

    def run(n, steps=12):
        g = torch.Generator().manual_seed(n)
        scores = [torch.nn.Parameter(torch.rand(1, generator=g) * 0.3) for _ in range(n)]
        ref = [s.detach().clone() for s in scores]
        weights = [float(w) for w in torch.rand(n, generator=g) + 0.5]
        opt = ProximalScoreSGD(scores, lr=0.05, momentum=0.9, penalty=0.3, weights=weights, warmup_steps=3)
        bufs = [None] * n
        counts = []
        for step in range(1, steps + 1):
            grads = [torch.randn(1, generator=g) * 0.1 for _ in range(n)]
            for s, gr in zip(scores, grads):
                s.grad = gr.clone()
            _, count = count_ops(opt.step)
            counts.append(count.ops)
            _reference_prox_step(ref, bufs, grads, 0.05, 0.9, 0.3, weights, step, 3)
            for s, r in zip(scores, ref):
                torch.testing.assert_close(s.detach(), r, rtol=0, atol=0)
        return counts

    few, many = run(3), run(40)
    assert few == many  # the same ops for 3 scores and for 40: multi-tensor, not a loop
    assert max(many) <= 12
