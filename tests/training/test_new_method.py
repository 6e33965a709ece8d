"""A new baseline is one class in one file (`bitfit_method.py`): registered, it runs through
`ftn train`, `ftn sweep --quick` (its grid centred on its own rate) and `ftn demo`, its label
reaches the tables, and its options section (`method.bitfit.*`) is set like any other config
key, with no table, list or schema elsewhere edited."""

import json

import pytest
import torch

from helpers import bitfit_method  # noqa: F401  (registers method "bitfit")
from helpers.tiny import tiny_method
from ftn import ConfigError
from ftn.apps.cli import main
from ftn.training.config import load_config
from ftn.training.methods import METHODS

from apps.sweep.test_sweep import TINY as SWEEP_TINY
from helpers.tiny import EMBEDDED, TINY


def test_the_new_method_is_registered_with_what_it_declares():
    cls = METHODS["bitfit"]
    assert cls.display_name() == "BitFit (biases + head)" and cls.default_lr == 1e-3
    assert not cls.full_size_update and not cls.supports_budget
    assert cls.options is bitfit_method.BitFitConfig


def test_the_new_methods_options_are_config_keys():
    cfg = load_config(None, ["method.name=bitfit", "method.bitfit.norm_biases=false"])
    assert cfg.method.bitfit.norm_biases is False and load_config(None).method.bitfit.norm_biases is True
    with pytest.raises(ConfigError, match="did you mean 'method.bitfit.norm_biases'"):
        load_config(None, ["method.bitfit.norm_bias=false"])
    with pytest.raises(ConfigError, match="norm_biases must be true or false"):
        load_config(None, ["method.bitfit.norm_biases=3"])
    # The option is used: without the norms' biases only the convs' and Linears' train.
    both = tiny_method("bitfit")
    convs = tiny_method("bitfit", bitfit=bitfit_method.BitFitConfig(norm_biases=False))
    for method in (both, convs):
        method.add_task("d", torch.nn.Linear(16, 3))
    trained = [method.info()["body_parameters"]["d"] for method in (both, convs)]
    assert trained[0] > trained[1] > 0


@pytest.mark.slow
def test_a_new_method_in_one_file_runs_through_train_sweep_and_demo(tmp_path):
    """Its option set by an override in `ftn train` and as a grid axis of `ftn sweep`."""
    out = tmp_path / "train"
    assert main(["train", "--no-progress", "--config", str(EMBEDDED), *TINY, f"output_dir={out}",
                 "method.name=bitfit", "method.bitfit.norm_biases=false", "train.max_steps=2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "bitfit" and results["tasks"]["mnist"]["steps"] == 2
    # tiny_convnet's only biases are its GroupNorms': with norm_biases=false the head alone trains.
    assert results["method_info"] == {"norm_biases": False, "body_parameters": {"mnist": 0}}
    assert json.loads((out / "config.json").read_text())["method"]["bitfit"] == {"norm_biases": False}

    sweep = tmp_path / "sweep"
    assert main(["sweep", "--demo", "multidomain", "--quick", "--methods", "ftn", "bitfit", "--seeds", "0",
                 "--lr-extend", "0", "--output", str(sweep), "--no-progress",
                 "--grid", "bitfit:method.bitfit.norm_biases=true,false", *SWEEP_TINY]) == 0
    swept = json.loads((sweep / "results.json").read_text())
    assert swept["lr_grid"]["bitfit"] == [0.0005, 0.001, 0.002]  # centred on BitFitMethod.default_lr
    assert "| bitfit | method.bitfit.norm_biases=false |" in (sweep / "table.md").read_text()
    norm_biases = {g["grid_point"]: g["method_info"]["norm_biases"] for g in swept["groups"] if g["method"] == "bitfit"}
    assert norm_biases == {"method.bitfit.norm_biases=true": True, "method.bitfit.norm_biases=false": False}

    demo = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(demo), "--no-progress", "--methods", "bitfit",
                 "train.max_steps=2", "data.test_limit=32", "data.val_limit=32"]) == 0
    ran = json.loads((demo / "results.json").read_text())
    assert ran["settings"]["lr"] == {"bitfit": 1e-3}
    assert "| BitFit (biases + head) |" in (demo / "table.md").read_text()
