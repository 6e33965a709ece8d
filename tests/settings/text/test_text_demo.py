"""`ftn demo --text` on a tiny slice: every method through the engine, budgets, the table."""

from __future__ import annotations

import pytest

from helpers import needs_minilm


@pytest.mark.slow
def test_text_demo_tiny_run_all_methods(tmp_path):
    needs_minilm()
    pytest.importorskip("peft")
    from ftn.settings.text.demo import format_text_table, run_text_demo

    results = run_text_demo(tmp_path, quick=True, progress=False, extra=[
        "data.tasks=[sentiment,tweets]", "data.train_limit=16", "data.test_limit=16", "data.max_len=16",
        "train.max_steps=2"])
    assert (tmp_path / "results.json").exists() and (tmp_path / "table.md").exists()
    methods = results["methods"]
    assert list(methods) == ["ftn", "lora", "norm_head", "linear", "full"]
    for entry in methods.values():
        assert set(entry["tasks"]) == {"sentiment", "tweets"}
        assert all(0.0 <= r["test"]["acc"] <= 100.0 for r in entry["tasks"].values())
    backbone = methods["ftn"]["backbone_parameters"]
    assert 22_000_000 < backbone < 23_000_000  # all-MiniLM-L6-v2 without pooler
    # LoRA is matched to FTN's budget: for Linear layers equal ranks hold equal numbers
    assert methods["lora"]["method_info"]["lora_rank"] == methods["ftn"]["method_info"]["rank"] == 8
    assert methods["lora"]["trainable_per_task"] == methods["ftn"]["trainable_per_task"]
    assert methods["ftn"]["stored_parameters"] == backbone + sum(methods["ftn"]["trainable_per_task"].values())
    full = methods["full"]
    assert full["stored_parameters"] == sum(full["trainable_per_task"].values()) > 2 * backbone
    assert methods["linear"]["trainable_per_task"] == {"sentiment": 384 * 2 + 2, "tweets": 384 * 2 + 2}
    ln = methods["norm_head"]["trainable_per_task"]["sentiment"]
    assert ln == 13 * 2 * 384 + 384 * 2 + 2  # embeddings LN + 2 per layer × 6 layers, weight and bias
    table = format_text_table(results)
    assert table.count("\n|") >= 6 and "LoRA" in table and "stored (all tasks)" in table
