"""A setting is a package: a third-party one, registered through the ``ftn.settings`` entry-point
group, is picked up by ``ftn train`` / ``ftn demo`` / ``ftn sweep --demo`` with no edit to the
CLI or the sweep."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from ftn.apps.cli import main
from ftn.training import settings_registry

TOY = '''
import json
from pathlib import Path

from ftn.training.config import apply_overrides, new_config
from ftn.training.setting import Setting
from ftn.training.settings_registry import Demo, SettingEntry

SETTING = SettingEntry(
    name="toy", setting="toy_ftn_setting:ToySetting", score="toy score (%), mean over tasks",
    headline="toy {acc:.1f}",
    demo=Demo(name="toydemo", help="a toy demo", output="outputs/toy_demo", run="toy_ftn_setting:run",
              table="toy_ftn_setting:table", sweep="toy_ftn_setting:sweep_configs"))


class ToySetting(Setting):
    name = "toy"


def run(output, quick=False, progress=True, extra=()):
    results = {"quick": quick, "extra": list(extra)}
    Path(output).mkdir(parents=True, exist_ok=True)
    (Path(output) / "results.json").write_text(json.dumps(results))
    return results


def table(results):
    return "| toy | quick=%s |" % results["quick"]


def sweep_configs(output, quick, overrides):
    return lambda method: apply_overrides(new_config("toy"), [f"method.name={method}", *overrides])
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """An installed package ``toy_ftn_setting`` with its entry point, as pip would leave it."""
    root = tmp_path / "site"
    (root / "toy_ftn_setting").mkdir(parents=True)
    (root / "toy_ftn_setting" / "__init__.py").write_text(textwrap.dedent(TOY))
    info = root / "toy_ftn_setting-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-ftn-setting\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ftn.settings]\ntoy = toy_ftn_setting\n")
    monkeypatch.syspath_prepend(str(root))
    settings_registry.refresh()
    yield
    sys.modules.pop("toy_ftn_setting", None)
    settings_registry.refresh()


def test_builtin_settings_are_found_without_importing_them():
    names = settings_registry.setting_names()
    assert names[:3] == ["classification", "dense", "text"]
    assert list(settings_registry.SETTINGS)[:3] == names[:3]
    assert set(settings_registry.demo_entries()) >= {"multidomain", "dense", "text"}
    assert settings_registry.setting_entry("dense").demo.output == "outputs/dense_demo"


def test_a_third_party_setting_is_picked_up_by_train_demo_and_sweep(toy, tmp_path, capsys, monkeypatch):
    from ftn.training.config import load_config

    assert "toy" in settings_registry.setting_names()
    cfg = load_config(None, ["setting=toy", "method.name=full"])
    assert type(cfg).__name__ == "ExperimentConfig" and cfg.setting == "toy"

    # ftn demo --toy: the setting's flag, help, runner, table and last line.
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "--toy" in capsys.readouterr().out
    out = tmp_path / "demo"
    assert main(["demo", "--toy", "--quick", "--output", str(out), "train.epochs=1"]) == 0
    printed = capsys.readouterr().out
    assert "| toy | quick=True |" in printed and f"results in {out}" in printed
    assert json.loads((out / "results.json").read_text()) == {"quick": True, "extra": ["train.epochs=1"]}
    assert main(["demo", "--toy", "--text"]) == 2
    assert "choose one of --text and --toy" in capsys.readouterr().err

    # ftn sweep --demo toydemo: the demo's base configs (the sweep itself is the usual one).
    import ftn.apps.sweep as sweep

    seen = {}
    monkeypatch.setattr(sweep, "run_sweep", lambda spec: seen.setdefault("spec", spec) and {"rows": [], "trained": []})
    assert main(["sweep", "--demo", "toydemo", "--methods", "ftn", "--seeds", "0", "--output", str(tmp_path / "s"),
                 "--no-progress", "train.epochs=2"]) == 0
    base = seen["spec"].base("ftn")
    assert (base.setting, base.method.name, base.train.epochs) == ("toy", "ftn", 2)
    with pytest.raises(SystemExit):
        main(["sweep", "--demo", "nope"])
    assert "'toydemo'" in capsys.readouterr().err
    # The sweep's table says what the toy's score is.
    from ftn.apps.sweep.report import format_table

    table = format_table({"setting": "toy", "seeds": [0], "groups": [], "comparisons": []})
    assert "Score: toy score (%), mean over tasks" in table
