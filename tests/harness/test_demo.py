"""`ftn demo --quick` end to end (this is the CI run of the main job)."""

import json

import pytest

from ftn.cli import main


@pytest.mark.slow
def test_demo_quick_runs_every_method_and_writes_outputs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    methods = results["methods"]
    assert set(methods) == {"ftn", "full", "linear", "norm_head", "lora"}
    for summary in methods.values():
        assert list(summary["tasks"]) == ["mnist", "fashion", "animal", "optdigits"]
        assert 0.0 <= summary["mean_test_acc"] <= 100.0
    stored = {m: s["stored_parameters"] for m, s in methods.items()}
    # Full fine-tuning stores four networks; every other method one backbone plus small extras.
    assert stored["full"] > 3.5 * stored["linear"]
    assert stored["linear"] < stored["norm_head"] < stored["ftn"] < stored["full"]
    assert (out / "accuracy_vs_parameters.png").stat().st_size > 1000
    assert "| FTN |" in (out / "table.md").read_text() and "| FTN |" in printed
