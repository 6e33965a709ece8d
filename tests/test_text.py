"""The offline text benchmark: its data file, and a tiny end-to-end run of every method."""

from __future__ import annotations

import copy

import pytest
import torch

from ftn.text.data import TEXT_TASKS_FILE, load_text_tasks


def test_text_tasks_file_is_compact_consistent_and_split_cleanly():
    assert TEXT_TASKS_FILE.stat().st_size < 8_000_000
    tasks, meta = load_text_tasks()
    assert sorted(tasks) == ["news20", "reuters8", "sentiment", "tweets"]
    for name, splits in tasks.items():
        info = meta["tasks"][name]
        seen = {}
        for split, data in splits.items():
            assert len(data) == info["counts"][split]["n"] > 0
            assert data.ids.shape == (len(data), meta["max_len"])
            assert int(data.labels.max()) < len(info["classes"])
            assert torch.all(data.ids[:, 0] == 101)  # [CLS]
            # padding is 0 exactly after the real tokens
            positions = torch.arange(data.ids.shape[1])[None, :]
            assert torch.all((data.ids == 0) == (positions >= data.lengths[:, None]))
            seen[split] = {tuple(row[:n].tolist()) for row, n in zip(data.ids, data.lengths)}
        assert not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"]), name
        assert len(set(splits["train"].labels.tolist())) == len(info["classes"])  # every class trains


def test_text_benchmark_tiny_run_all_methods(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from ftn.text.backbone import minilm_path
    from ftn.text.demo import QUICK, format_text_table, run_text_benchmark

    try:
        minilm_path()
    except Exception as exc:  # the pretrained model is an optional, separately installed package
        pytest.skip(str(exc))
    cfg = copy.deepcopy(QUICK)
    cfg.tasks = ["sentiment", "tweets"]
    cfg.train_per_task, cfg.test_per_task, cfg.max_len, cfg.epochs, cfg.probe_steps = 16, 16, 16, 1, 5
    results = run_text_benchmark(cfg, output=tmp_path)
    assert (tmp_path / "results.json").exists() and (tmp_path / "table.md").exists()
    methods = results["methods"]
    assert list(methods) == ["ftn", "lora", "ln_head", "linear", "full"]
    for entry in methods.values():
        assert set(entry["accuracy"]) == {"sentiment", "tweets"}
        assert all(0.0 <= a <= 1.0 for a in entry["accuracy"].values())
    backbone = results["backbone_params"]
    assert 22_000_000 < backbone < 23_000_000  # all-MiniLM-L6-v2 without pooler
    # LoRA is matched to FTN's budget: for Linear layers equal ranks hold equal numbers
    assert methods["lora"]["lora_rank"] == cfg.rank
    assert methods["lora"]["trainable_per_task"] == methods["ftn"]["trainable_per_task"]
    assert methods["ftn"]["stored_total"] == backbone + sum(methods["ftn"]["trainable_per_task"].values())
    assert methods["full"]["stored_total"] == sum(methods["full"]["trainable_per_task"].values()) > 2 * backbone
    assert methods["linear"]["trainable_per_task"] == {"sentiment": 384 * 2 + 2, "tweets": 384 * 2 + 2}
    ln = methods["ln_head"]["trainable_per_task"]["sentiment"]
    assert ln == 13 * 2 * 384 + 384 * 2 + 2  # embeddings LN + 2 per layer × 6 layers, weight and bias
    table = format_text_table(results)
    assert table.count("\n|") >= 6 and "LoRA" in table and "stored (all tasks)" in table
