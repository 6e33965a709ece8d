"""One config schema: settings, typed overrides, close-key suggestions, validation."""

import pytest

from ftn import ConfigError
from ftn.training.config import ExperimentConfig, apply_overrides, load_config, new_config

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
