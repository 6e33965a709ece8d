"""The offline text benchmark's data file (the text setting and demo: tests/harness/)."""

from __future__ import annotations

import torch

from ftn.settings.text.data import TEXT_TASKS_FILE, load_text_tasks


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
