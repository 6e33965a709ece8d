"""docs/peft.md's CNN example runs as written and prints what the page says."""

from __future__ import annotations

import re

import pytest

from helpers import REPO

pytest.importorskip("peft")
pytest.importorskip("torchvision")


def test_cnn_example_runs_and_prints_the_documented_numbers(tmp_path, monkeypatch, capsys, one_thread):
    page = (REPO / "docs" / "peft.md").read_text()
    section = page.split("## A CNN", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    printed = re.search(r"It prints.*?```\n(.*?)```", section, re.S)[1]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/peft.md", "exec"), {"__name__": "docs_peft"})
    out = capsys.readouterr().out
    for line in printed.splitlines():
        if line.strip() and line.strip() != "...":
            assert line.rstrip() in out, (line, out)
    assert (tmp_path / "sketch" / "adapter_model.safetensors").exists()
