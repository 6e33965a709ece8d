"""``method.budget``: `ftn train` chooses per-layer ranks with a probe, records them, resumes
without probing again; config errors for bad budgets."""

import json

import pytest
import torch

from ftn import ConfigError
from ftn.core.adapters import read_adapter
from ftn.apps.cli import main
from ftn.training import budget
from ftn.training.config import load_config
from ftn.training.methods import delta_used
from ftn.training.runner import run_experiment

from helpers.tiny import EMBEDDED, TINY

ARGS = [*TINY[:-1], "data.domains=[mnist]", "train.max_steps=2", "method.budget=0.01", "train.checkpoint_every=1"]


def _ranks(path):
    return {n: v["rank"] for n, v in read_adapter(path)[1]["layers"].items()}


def test_train_with_a_budget_records_the_allocation_and_resumes_without_probing(tmp_path, monkeypatch):
    assert main(["train", "--no-progress", "--config", str(EMBEDDED), *ARGS, f"output_dir={tmp_path / 'full'}"]) == 0
    record = json.loads((tmp_path / "full" / "mnist" / "allocation.json").read_text())
    adapter = tmp_path / "full" / "adapters" / "mnist.safetensors"
    _, meta = read_adapter(adapter)
    assert _ranks(adapter) == record["ranks"] and record["delta"] <= record["budget"]
    assert meta["task_spec"]["budget"] == record["budget"] and meta["task_spec"]["allocation"] == "auto"
    assert record["probe_steps"] == 2 and set(record["scores"]) == set(record["ranks"])
    results = json.loads((tmp_path / "full" / "results.json").read_text())
    assert results["tasks"]["mnist"]["allocation"]["ranks"] == record["ranks"] and results["probe_seconds"] > 0
    got = results["method_info"]["tasks"]["mnist"]
    assert got["delta_parameters"] == record["delta"] == delta_used(results["method_info"]) and got["budget"] == 236
    assert got["ranks"]["max"] == max(record["ranks"].values()) and sum(got["ranks"]["counts"].values()) == 3

    # Interrupted after one step, then resumed: the allocation is read back, never probed again,
    # and the run ends where the uninterrupted one did.
    cfg = load_config(EMBEDDED, [*ARGS, f"output_dir={tmp_path / 'killed'}"])
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, progress=False, stop_after_steps=1)
    monkeypatch.setattr(budget, "_probe", lambda *a, **k: pytest.fail("probed again on resume"))
    run_experiment(load_config(EMBEDDED, [*ARGS, f"output_dir={tmp_path / 'killed'}"]), progress=False)
    resumed = tmp_path / "killed" / "adapters" / "mnist.safetensors"
    a, b = read_adapter(adapter)[0], read_adapter(resumed)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_uniform_allocation_is_the_largest_common_rank_plus_one_where_it_fits(tmp_path):
    """tiny_convnet at 1 %: 236 ΔW parameters; rank 1 everywhere costs 190, rank 2 everywhere
    380; the 46 left take one more component on the cheapest layer only (28; 57 and 105 do not fit)."""
    cfg = load_config(EMBEDDED, [*ARGS, "method.budget_allocation=uniform", "method.budget_init=fresh",
                                 f"output_dir={tmp_path}"])
    results = run_experiment(cfg, progress=False)
    result = results["tasks"]["mnist"]["allocation"]
    assert result["probe_seconds"] == 0 and result["uniform_rank"] == 1
    assert result["ranks"] == {"0": 2, "3": 1, "6": 1} and result["delta"] == 218 <= result["budget"] == 236
    record = json.loads((tmp_path / "mnist" / "allocation.json").read_text())
    assert record["uniform_base_rank"] == 1 and record["uniform_plus_one"] == 1 and record["delta"] == 218
    # method_info says what the task got, not the configured rank (method.ftn.rank=2).
    info = results["method_info"]
    assert info["rank"] == 2 and delta_used(info) == 218
    assert info["tasks"]["mnist"] == {"delta_parameters": 218, "budget": 236,
                                      "ranks": {"min": 1, "max": 2, "mean": 1.333, "counts": {"1": 2, "2": 1}}}


def test_uniform_with_probe_init_gets_the_same_head_start_as_auto(tmp_path):
    """The control for auto's probe: uniform ranks, the same probe steps, every component kept,
    and the real task starts from the probe's state."""
    cfg = load_config(EMBEDDED, [*ARGS, "method.budget_allocation=uniform", f"output_dir={tmp_path}"])
    result = run_experiment(cfg, progress=False)["tasks"]["mnist"]["allocation"]
    assert result["ranks"] == {"0": 2, "3": 1, "6": 1}
    assert result["probe_steps"] == 2 and result["probe_seconds"] > 0 and result["warm_rank"] == result["uniform_rank"]
    record = json.loads((tmp_path / "mnist" / "allocation.json").read_text())
    assert {n: len(k) for n, k in record["kept"].items()} == {n: r for n, r in record["ranks"].items() if r}
    assert (tmp_path / "mnist" / "allocation_init.safetensors").is_file()


@pytest.mark.parametrize("override, message", [
    ("method.budget=0", "method.budget must be"), ("method.budget=-3", "method.budget must be"),
    ("method.budget=2.5", "method.budget must be"), ("method.budget_allocation=greedy", "budget_allocation"),
    ("method.budget_probe=0", "budget_probe")])
def test_bad_budget_config(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(EMBEDDED, [*ARGS, override])
    with pytest.raises(ConfigError, match="not supported by method 'linear'"):
        load_config(EMBEDDED, [*ARGS, "method.name=linear"])


@pytest.mark.parametrize("value, message", [("100000000", "exceeds the backbone"), ("5", "smaller than the cheapest")])
def test_budget_that_does_not_fit_the_backbone_fails_before_training(tmp_path, value, message):
    cfg = load_config(EMBEDDED, [*ARGS, f"method.budget={value}", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=message):
        run_experiment(cfg, progress=False)
    assert not (tmp_path / "mnist" / "log.csv").exists()
