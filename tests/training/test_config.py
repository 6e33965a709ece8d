"""One config schema: settings, typed overrides, close-key suggestions, validation."""

import multiprocessing as mp
import pickle
from concurrent.futures import ProcessPoolExecutor

import pytest
import yaml

from ftn import ConfigError
from ftn.training.config import ExperimentConfig, apply_overrides, config_to_dict, load_config, new_config
from ftn.training.methods import METHODS, LoRAConfig, MethodConfig, TAPSConfig

from helpers.tiny import CONFIGS

NYUD = CONFIGS / "nyud_resnet18_r30.yaml"


def test_config_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epocs' \(did you mean 'train.epochs'\?\)"):
        apply_overrides(new_config(), ["train.epocs=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  nmae: ftn\n")
    with pytest.raises(ConfigError, match="method.nmae.*did you mean 'method.name'"):
        load_config(bad)
    # A key one section further down is named with its section.
    with pytest.raises(ConfigError, match=r"'method.rank' \(did you mean 'method.ftn.rank'\?\)"):
        apply_overrides(new_config(), ["method.rank=4"])
    with pytest.raises(ConfigError, match="must be an integer"):
        apply_overrides(new_config(), ["method.ftn.rank=abc"])
    with pytest.raises(ConfigError, match=r"method.ftn: rank must be a positive integer"):
        apply_overrides(new_config(), ["method.ftn.rank=0"])
    with pytest.raises(ConfigError, match="method.name must be one of"):
        apply_overrides(new_config(), ["method.name=lorra"])
    with pytest.raises(ConfigError, match=r"setting must be one of .* \(did you mean 'dense'\?\)"):
        load_config(None, ["setting=dence"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_config_overrides_are_typed():
    cfg = apply_overrides(new_config(), ["train.lr=3e-4", "data.domains=[a, b]", "data.train_limit=null",
                                         "method.ftn.rank_pattern={'layer4.*': 2}", "train.grad_clip=none",
                                         "data.augment=true", "method.ftn.fused_qkv=per_projection"])
    assert cfg.train.lr == 3e-4 and cfg.data.domains == ["a", "b"] and cfg.data.train_limit is None
    assert cfg.method.ftn.rank_pattern == {"layer4.*": 2} and cfg.train.grad_clip is None and cfg.data.augment is True
    assert cfg.method.ftn.fused_qkv == "per_projection"  # every FTNConfig option, validated by FTNConfig
    with pytest.raises(ConfigError, match="fused_qkv"):
        apply_overrides(new_config(), ["method.ftn.fused_qkv=both"])


def test_each_setting_has_its_own_data_and_model_sections():
    dense = load_config(NYUD, ["data.root=x"])
    assert dense.setting == "dense" and dense.data.tasks == ["semseg", "depth", "normals", "edge"]
    assert (dense.model.backbone, dense.model.output_stride, dense.method.ftn.rank) == ("resnet18", 16, 30)
    t = dense.train  # the same TrainConfig as every setting, with the RCM recipe
    assert (t.optimizer, t.lr, t.momentum, t.weight_decay, t.schedule) == ("sgd", 0.005, 0.9, 1e-4, "poly")
    assert (dense.data.batch_size, dense.data.crop, dense.data.scale_min, dense.data.scale_max, dense.data.flip) == \
        (8, [425, 560], 0.5, 2.0, True)
    with pytest.raises(ConfigError, match=r"unknown config key 'data.crop'"):
        load_config(None, ["data.crop=[8,8]"])  # classification has no crop
    assert type(ExperimentConfig(setting="dense").data) is type(dense.data)  # the setting's own sections
    with pytest.raises(ConfigError, match="dense setting's data section is DenseDataConfig"):
        ExperimentConfig(setting="dense", data=new_config("text").data)
    text = load_config(CONFIGS / "text_minilm.yaml")
    assert text.setting == "text" and text.data.max_len == 64 and text.train.poly_power == 1.0
    with pytest.raises(ConfigError, match="the text setting uses the pretrained all-MiniLM-L6-v2"):
        load_config(CONFIGS / "text_minilm.yaml", ["model.backbone=bert"])


def test_dense_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="did you mean 'train.lr'"):
        load_config(NYUD, ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"method.name .*\(did you mean 'ftn'\?\)"):
        load_config(NYUD, ["method.name=ftm"])
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(NYUD, ["data.batch_size=1"])
    with pytest.raises(ConfigError, match=r"task must be one of .* got 'depht'"):
        load_config(NYUD, ["data.tasks=[semseg,depht]"])


# ------------------------------------------------------------- each method's own section
def test_method_sections_are_declared_by_their_methods():
    cfg = new_config()
    assert isinstance(cfg.method.taps, TAPSConfig) and isinstance(cfg.method.lora, LoRAConfig)
    assert {name for name, cls in METHODS.items() if cls.options is not None} >= {"taps", "lora"}
    assert set(cfg.method.sections()) == {name for name, cls in METHODS.items() if cls.options is not None}
    cfg = load_config(None, ["method.name=lora", "method.lora.rank=4", "method.lora.alpha=8",
                             "method.taps.penalty=0.3"])
    assert (cfg.method.lora.rank, cfg.method.lora.alpha, cfg.method.taps.penalty) == (4, 8.0, 0.3)
    assert MethodConfig(name="taps", taps=TAPSConfig(penalty=2.0)).taps.penalty == 2.0


def test_method_section_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"'method.taps.penlty' \(did you mean 'method.taps.penalty'\?\)"):
        load_config(None, ["method.taps.penlty=0.3"])
    # a section's key one level up, or a misspelt section, is named with its section
    with pytest.raises(ConfigError, match=r"'method.penalty' \(did you mean 'method.taps.penalty'\?\)"):
        load_config(None, ["method.penalty=0.3"])
    with pytest.raises(ConfigError, match=r"did you mean 'method.taps'\?\); valid keys here: .*taps, lora"):
        load_config(None, ["method.tap.penalty=0.3"])
    with pytest.raises(ConfigError, match="method.lora.rank: cannot use .four."):
        load_config(None, ["method.lora.rank=four"])
    with pytest.raises(ConfigError, match="method.lora.rank must be >= 1"):
        load_config(None, ["method.lora.rank=0"])
    with pytest.raises(ConfigError, match="method.taps.tau must be > 0"):  # validated by TAPSConfig
        load_config(None, ["method.taps.tau=0"])
    with pytest.raises(ConfigError, match="method.taps is a section"):
        load_config(None, ["method.taps=1"])


def test_old_lora_keys_name_the_new_ones(tmp_path):
    for old, new in (("lora_rank", "rank"), ("lora_alpha", "alpha")):
        with pytest.raises(ConfigError, match=f"'method.{old}' is now 'method.lora.{new}'"):
            load_config(None, [f"method.{old}=4"])
        path = tmp_path / f"{old}.yaml"
        path.write_text(f"method:\n  name: lora\n  {old}: 4\n")
        with pytest.raises(ConfigError, match=f"'method.{old}' is now 'method.lora.{new}'"):
            load_config(path)


def test_budget_error_lists_the_methods_that_support_one():
    with pytest.raises(ConfigError, match=r"not supported by method 'linear' \(ftn, ftn_unfreeze, lora\)"):
        load_config(None, ["method.name=linear", "method.budget=0.01"])


_OVERRIDES = ["method.name=taps", "method.taps.penalty=0.3", "method.taps.weighting=params",
              "method.lora.rank=4", "method.ftn.rank=2", "train.lr=3e-4"]


def test_config_round_trips_through_its_dict_and_yaml(tmp_path):
    cfg = load_config(None, _OVERRIDES)
    data = config_to_dict(cfg)
    assert data["method"]["taps"]["penalty"] == 0.3 and data["method"]["lora"] == {"rank": 4, "alpha": None}
    assert "lora_rank" not in data["method"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    again = load_config(path)
    assert again == cfg and config_to_dict(again) == data
    assert again != load_config(None, _OVERRIDES[:-2])  # the sections count in equality too
    assert load_config(None, ["method.lora.alpha=2"]) != new_config()


def test_config_pickles_with_its_method_sections():
    from helpers import bitfit_method  # noqa: F401  (registers "bitfit" and its section)

    cfg = load_config(None, [*_OVERRIDES, "method.bitfit.norm_biases=false"])
    again = pickle.loads(pickle.dumps(cfg))
    assert again == cfg and again.method.taps.penalty == 0.3 and again.method.bitfit.norm_biases is False
    assert "taps=TAPSConfig(tau=0.1, penalty=0.3" in repr(cfg.method)


@pytest.mark.slow
def test_config_reaches_a_spawned_worker_with_a_test_modules_method():
    """`ftn demo` / `ftn sweep --workers` train in spawned processes: the config arrives whole,
    and unpickling the section of a method registered in a test module imports that module,
    which registers the method there too (repr lists the sections of the registered methods)."""
    from helpers import bitfit_method  # noqa: F401

    cfg = load_config(None, [*_OVERRIDES, "method.name=bitfit", "method.bitfit.norm_biases=false"])
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        there = pool.submit(repr, cfg.method).result()
    assert "bitfit=BitFitConfig(norm_biases=False)" in there and there == repr(cfg.method)
