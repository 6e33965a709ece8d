"""The README's Python example must run as written."""

import re

from helpers import REPO

README = REPO / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "paper convention" in out and out.strip().endswith("True")
    assert (tmp_path / "sketch.safetensors").stat().st_size > 0
