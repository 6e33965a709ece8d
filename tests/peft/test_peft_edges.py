"""The PEFT method's registration, adapter files, options and refusals: every bad input is an
ftn error naming the problem."""

from __future__ import annotations

import copy
import importlib.metadata
import json

import pytest
import torch
from torch import nn

pytest.importorskip("peft")

import ftn.peft  # noqa: E402
from ftn.core.errors import ConfigError, FTNError, TaskError  # noqa: E402
from helpers import SmallCNN, randomize_norms  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING  # noqa: E402
from peft.utils import PeftType  # noqa: E402

CONVS = ["stem", "same", "depthwise", "grouped", "pointwise", "fc"]


def base() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(SmallCNN()).eval()


def images() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def nudge(model: nn.Module, scale: float = 0.05) -> None:
    """Move every trainable tensor off its start, as training would."""
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def test_registered_once_under_its_own_type():
    kind = PeftType("FTN")
    assert kind is PeftType.FTN is PeftType["FTN"] and kind in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[kind] is ftn.peft.FTNPeftConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[kind] is ftn.peft.FTNPeftModel
    ftn.peft.register(ftn.peft.FTNPeftConfig, ftn.peft.FTNPeftModel)  # importing again is a no-op
    assert list(PeftType).count(kind) == 1


def test_adapter_files_hold_the_adapter_only_without_its_name(tmp_path):
    model = get_peft_model(base(), ftn.peft.FTNPeftConfig(r=3, target_modules=CONVS))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["task_norms"], sorted(config["target_modules"])) == \
        ("FTN", 3, True, sorted(CONVS))
    from safetensors.torch import load_file

    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.stem.ftn_factors.factors.0" in keys
    assert "base_model.model.bn1.ftn_norms.running_mean" in keys
    assert not any("base_layer" in k or ".default" in k for k in keys), keys
    report = model.base_model.parameter_report()
    stored = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(t.numel() for t in stored.values()) == report.tasks["default"].total + report.tasks["default"].norm_buffers


def test_rank_pattern_and_caps_follow_ftn():
    """PEFT's pattern matching for ranks, ftn's cap: the depthwise conv (modes 8, 1, 9) holds at
    most rank 3; rank 0 leaves a layer unadapted for the adapter."""
    model = get_peft_model(base(), ftn.peft.FTNPeftConfig(r=2, target_modules=CONVS,
                                                          rank_pattern={"depthwise": 16, "pointwise": 0}))
    task = model.base_model.parameter_report().tasks["default"]
    caps = {c.layer: (c.requested, c.applied) for c in task.caps}
    assert caps == {"depthwise": (16, 3)}
    assert task.layers == len(CONVS) - 1 and not model.base_model.model.pointwise.ftn_factors
    x = images()
    reference = base()
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reference(x))


@pytest.mark.parametrize("fast", [True, False])
def test_fast_backward_option_gives_the_autograd_gradients(fast):
    """fast_backward (ftn's thin-contraction backward or plain autograd) reaches every layer and
    both give the same factor gradients."""
    grads = {}
    for choice in (fast, None):
        model = get_peft_model(base(), ftn.peft.FTNPeftConfig(r=3, target_modules=CONVS, fast_backward=choice))
        nudge(model)
        layers = [m for m in model.modules() if isinstance(m, ftn.peft.FTNPeftFactors)]
        assert all(m.ftn_engine.fast_backward is choice for m in layers)
        model.train()
        model(images()).square().mean().backward()
        grads[choice] = {n: p.grad.clone() for n, p in model.named_parameters() if ".ftn_factors." in n}
    for name, grad in grads[fast].items():
        torch.testing.assert_close(grad, grads[None][name], rtol=1e-4, atol=1e-6)


def test_one_adapter_runs_and_merges_at_a_time():
    model = get_peft_model(base(), ftn.peft.FTNPeftConfig(r=3, target_modules=CONVS))
    model.add_adapter("b", ftn.peft.FTNPeftConfig(r=3, target_modules=CONVS))
    model.base_model.set_adapter(["default", "b"])
    with pytest.raises(ConfigError, match=r"one at a time.*'default', 'b'.*set_adapter"):
        model(images())
    model.set_adapter("default")
    with pytest.raises(ConfigError, match="merges one adapter at a time"):
        model.merge_adapter(["default", "b"])


def test_merge_adapter_in_place_and_back():
    model = get_peft_model(base(), ftn.peft.FTNPeftConfig(r=3, target_modules=CONVS)).eval()
    nudge(model)
    x = images()
    with torch.no_grad():
        task = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), task, rtol=1e-5, atol=1e-6)
        model.unmerge_adapter()
        torch.testing.assert_close(model(x), task, rtol=1e-5, atol=1e-6)
        assert torch.equal(model.base_model.model.bn1.base_layer.running_mean, base().bn1.running_mean)


@pytest.mark.parametrize("options, message", [
    (dict(r=0), "rank must be a positive integer"),
    (dict(rank_pattern={"stem": -1}), r"rank_pattern\['stem'\] must be an integer >= 0"),
    (dict(init="xavier"), "unknown factor init 'xavier'"),
    (dict(task_norms="yes"), "task_norms must be true or false"),
    (dict(fast_backward="fast"), "fast_backward must be true, false or null"),
])
def test_bad_options_are_refused_with_the_option_named(options, message):
    with pytest.raises(ConfigError, match=message):
        ftn.peft.FTNPeftConfig(target_modules=CONVS, **options)


def test_targets_ftn_cannot_adapt_are_refused():
    net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match=r"cannot adapt '0' \(Embedding\).*nn.Linear, nn.Conv1d/2d/3d"):
        get_peft_model(net, ftn.peft.FTNPeftConfig(target_modules=["0", "1"]))
    attention = nn.Sequential(nn.MultiheadAttention(4, 2))
    with pytest.raises(ConfigError, match=r"'0.out_proj' on its own: nn.MultiheadAttention"):
        get_peft_model(attention, ftn.peft.FTNPeftConfig(target_modules=["out_proj"]))
    with pytest.raises(ConfigError, match="needs target_modules"):
        get_peft_model(base(), ftn.peft.FTNPeftConfig())


def test_adapter_names_must_fit_parameter_keys():
    model = get_peft_model(base(), ftn.peft.FTNPeftConfig(r=3, target_modules=CONVS))
    with pytest.raises(TaskError, match="without '.'"):
        model.add_adapter("v1.2", ftn.peft.FTNPeftConfig(r=3, target_modules=CONVS))


def test_task_norms_off_and_excluded_norms_keep_no_copy():
    model = get_peft_model(base(), ftn.peft.FTNPeftConfig(r=3, target_modules=CONVS, task_norms=False))
    assert model.base_model.parameter_report().norm_layers == 0
    model = get_peft_model(base(), ftn.peft.FTNPeftConfig(r=3, target_modules=CONVS, exclude_modules=["ln"]))
    report = model.base_model.parameter_report()
    assert report.norm_layers == 3 and type(model.base_model.model.ln) is nn.LayerNorm


def test_too_old_peft_is_named(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.13.2")
    with pytest.raises(FTNError, match=r"needs peft >= 0.21 \(peft 0.13.2 is installed\).*\[peft\]"):
        ftn.peft.check_peft()


def test_loaded_adapter_can_be_trained_further(tmp_path):
    """from_pretrained(is_trainable=True) continues training the loaded factors."""
    model = get_peft_model(base(), ftn.peft.FTNPeftConfig(r=3, target_modules=CONVS))
    nudge(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base(), tmp_path, is_trainable=True)
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable and all(".ftn_" in n for n in trainable)
    assert len(trainable) == sum(1 for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv3d])
def test_conv1d_and_conv3d(conv):
    """The other conv dimensions, grouped: exact start, a trained adapter merges to the same outputs."""
    torch.manual_seed(0)
    net = nn.Sequential(conv(4, 8, 3, padding=1, groups=2), nn.ReLU(), conv(8, 8, 1))
    x = torch.randn(2, 4, *([6] * (1 if conv is nn.Conv1d else 3)))
    with torch.no_grad():
        want = net(x)
    model = get_peft_model(net, ftn.peft.FTNPeftConfig(r=2, target_modules=["0", "2"])).eval()
    with torch.no_grad():
        assert torch.equal(model(x), want)
        nudge(model)
        task = model(x)
        assert not torch.allclose(task, want)
        torch.testing.assert_close(model.merge_and_unload()(x), task, rtol=1e-5, atol=1e-6)


def test_half_precision_base_keeps_its_adapters_in_its_dtype(tmp_path):
    """A bfloat16 model: the adapters stay bfloat16 (PEFT would upcast them to float32, which ftn's
    layers do not mix with half-precision weights), train, round-trip and merge."""
    model = get_peft_model(base().to(torch.bfloat16), ftn.peft.FTNPeftConfig(r=3, target_modules=CONVS))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    x = images().to(torch.bfloat16)
    model.train()
    model(x).float().square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    nudge(model)
    model.eval()
    with torch.no_grad():
        task = model(x)
        model.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(base().to(torch.bfloat16), tmp_path).eval()
        assert torch.equal(loaded(x), task)
        torch.testing.assert_close(model.merge_and_unload()(x), task, rtol=2e-2, atol=2e-2)


def test_a_deep_copy_computes_with_its_own_tensors():
    """The ftn wrapper each layer computes with sits outside the module tree; a deep copy of the
    model (what Trainer / EMA / model soups do) must still compute with the copy's own tensors."""
    model = get_peft_model(base(), ftn.peft.FTNPeftConfig(r=3, target_modules=CONVS)).eval()
    twin = copy.deepcopy(model)
    layer = twin.base_model.model.stem
    assert layer.ftn_engine.base is layer.base_layer and layer.ftn_engine.tasks is layer.ftn_factors
    x = images()
    with torch.no_grad():
        before = model(x)
        nudge(twin)
        assert torch.equal(model(x), before) and not torch.allclose(twin(x), before)
