"""`ftn demo --quick` end to end (this is the CI run of the main job)."""

import json

import pytest

from ftn.apps.cli import main


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


def test_demo_overrides_after_methods_are_overrides_not_methods(monkeypatch, tmp_path):
    """`ftn demo --methods ftn method.ftn.rank=2`: argparse hands the override to --methods; the
    demo must still run method ftn with the override (it used to fail as an unknown method)."""
    import ftn.settings.classification.demo as demo

    seen = {}

    def fake_run_demo(output, quick, methods, progress, extra):
        seen.update(methods=methods, extra=extra)
        return {"wall_seconds": 0.0, "quick": quick, "methods": {}}

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    monkeypatch.setattr(demo, "format_table", lambda results: "")
    assert main(["demo", "--methods", "ftn", "method.ftn.rank=2", "--output", str(tmp_path)]) == 0
    assert seen == {"methods": ("ftn",), "extra": ["method.ftn.rank=2"]}
