"""A new baseline is one class in one file (`bitfit_method.py`): registered, it runs through
`ftn train`, `ftn sweep --quick` (its grid centred on its own rate) and `ftn demo`, and its label
reaches the tables, with no table or list elsewhere edited."""

import json

import pytest

from helpers import bitfit_method  # noqa: F401  (registers method "bitfit")
from ftn.apps.cli import main
from ftn.training.methods import METHODS

from test_sweep import TINY as SWEEP_TINY
from test_train_configs import EMBEDDED, TINY


def test_the_new_method_is_registered_with_what_it_declares():
    cls = METHODS["bitfit"]
    assert cls.display_name() == "BitFit (biases + head)" and cls.default_lr == 1e-3
    assert not cls.full_size_update and not cls.supports_budget


@pytest.mark.slow
def test_a_new_method_in_one_file_runs_through_train_sweep_and_demo(tmp_path):
    out = tmp_path / "train"
    assert main(["train", "--no-progress", "--config", str(EMBEDDED), *TINY, f"output_dir={out}",
                 "method.name=bitfit", "train.max_steps=2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "bitfit" and results["tasks"]["mnist"]["steps"] == 2

    sweep = tmp_path / "sweep"
    assert main(["sweep", "--demo", "multidomain", "--quick", "--methods", "ftn", "bitfit", "--seeds", "0",
                 "--lr-extend", "0", "--output", str(sweep), "--no-progress", *SWEEP_TINY]) == 0
    swept = json.loads((sweep / "results.json").read_text())
    assert swept["lr_grid"]["bitfit"] == [0.0005, 0.001, 0.002]  # centred on BitFitMethod.default_lr
    assert "| bitfit |" in (sweep / "table.md").read_text()

    demo = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(demo), "--no-progress", "--methods", "bitfit",
                 "train.max_steps=2", "data.test_limit=32", "data.val_limit=32"]) == 0
    ran = json.loads((demo / "results.json").read_text())
    assert ran["settings"]["lr"] == {"bitfit": 1e-3}
    assert "| BitFit (biases + head) |" in (demo / "table.md").read_text()
