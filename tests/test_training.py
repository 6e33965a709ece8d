"""Training engine, methods, configs, resume, incremental domains and the paper config."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ftn import ConfigError
from ftn.training.config import DataConfig, ExperimentConfig, MethodConfig, TrainConfig, apply_overrides, load_config
from ftn.training.engine import DomainData, NonFiniteLossError, train_domain
from ftn.training.methods import lora_delta_params, make_method, matched_lora_rank

from conftest import SmallCNN, randomize_norms, tensor_hash

ROOT = Path(__file__).resolve().parents[1]


def tiny_data(n=48, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x[y == 1] += 0.5  # something learnable
    ds = TensorDataset(x, y)
    return DomainData("d", ds, TensorDataset(x[:16], y[:16]), TensorDataset(x[16:32], y[16:32]), classes)


def tiny_method(name="ftn", **kw):
    torch.manual_seed(0)
    backbone = randomize_norms(SmallCNN()).eval()
    return make_method(MethodConfig(name=name, rank=2, **kw), backbone, 16, torch.device("cpu"))


def run(tmp, method_name="ftn", stop=None, train=None, data=None, method=None):
    method = method or tiny_method(method_name)
    domain = method.add_domain("d", 3) if "d" not in method.domains else method.domains["d"]
    train = train or TrainConfig(epochs=2, checkpoint_every=2, lr=1e-2)
    result = train_domain(domain, data or tiny_data(), train, DataConfig(batch_size=8, eval_batch_size=16),
                          tmp, seed=0, progress=False, stop_after_steps=stop)
    return method, domain, result


def test_config_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epocs' \(did you mean 'train.epochs'\?\)"):
        apply_overrides(ExperimentConfig(), ["train.epocs=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  rnak: 4\n")
    with pytest.raises(ConfigError, match="method.rnak.*did you mean 'method.rank'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="must be an integer"):
        apply_overrides(ExperimentConfig(), ["method.rank=abc"])
    with pytest.raises(ConfigError, match="method.name must be one of"):
        apply_overrides(ExperimentConfig(), ["method.name=lorra"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_config_overrides_are_typed():
    cfg = apply_overrides(ExperimentConfig(), ["train.lr=3e-4", "data.domains=[a, b]", "data.train_limit=null",
                                               "method.rank_pattern={'layer4.*': 2}", "train.grad_clip=none",
                                               "data.augment=true"])
    assert cfg.train.lr == 3e-4 and cfg.data.domains == ["a", "b"] and cfg.data.train_limit is None
    assert cfg.method.rank_pattern == {"layer4.*": 2} and cfg.train.grad_clip is None and cfg.data.augment is True


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    method_a, domain_a, full_result = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop=3)  # "crash" after step 3; the last checkpoint is at step 2
    method_b, domain_b, resumed = run(tmp_path / "b")
    state_a, state_b = domain_a.state_dict(), domain_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        assert torch.equal(state_a[k], state_b[k]), k
    assert resumed.test_acc == full_result.test_acc and resumed.steps == full_result.steps == 12
    assert (tmp_path / "b" / "checkpoint.pt.prev").exists()


def test_truncated_checkpoint_falls_back_to_previous(tmp_path, caplog):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, stop=5)  # checkpoints at steps 2 and 4
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    _, domain, result = run(tmp_path)
    assert "unreadable" in caplog.text and result.steps == 12


def test_nonfinite_loss_stops_with_clear_message(tmp_path):
    data = tiny_data()
    data.train.tensors[0][5] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step \d+"):
        run(tmp_path / "stop", data=data)
    _, _, result = run(tmp_path / "skip", data=data, train=TrainConfig(epochs=1, on_nonfinite="skip", lr=1e-2))
    assert result.skipped_batches == 1


@pytest.mark.parametrize("name", ["ftn", "full", "linear", "bn_head", "lora"])
def test_each_method_trains_only_its_parameters(tmp_path, name):
    method = tiny_method(name)
    domain = method.add_domain("d", 3)
    expected = {
        "linear": 16 * 3 + 3,
        "full": sum(p.numel() for p in SmallCNN().parameters()) + 16 * 3 + 3,
    }
    if name in expected:
        assert domain.num_trainable() == expected[name]
    pretrained_hash = tensor_hash(method.pretrained.state_dict().values()) if name in ("full", "lora") else None
    _, _, result = run(tmp_path, method=method, train=TrainConfig(max_steps=3, lr=1e-2))
    assert result.steps == 3 and result.test_acc is not None
    if pretrained_hash:  # per-domain copies leave the shared pretrained backbone alone
        assert tensor_hash(method.pretrained.state_dict().values()) == pretrained_hash
    if name == "linear":  # a linear probe keeps the backbone's BatchNorm statistics frozen
        bn = method.backbone.bn1
        fresh = randomize_norms(SmallCNN())
        assert torch.equal(bn.running_mean, fresh.bn1.running_mean)
    assert method.stored_parameters() > 0


def test_lora_rank_matches_ftn_budget():
    backbone = SmallCNN()
    per_rank = lora_delta_params(backbone, 1)
    assert matched_lora_rank(backbone, 3 * per_rank) == 3
    assert matched_lora_rank(backbone, 1) == 1


def test_paper_domainnet_config_runs_two_steps_on_fixture(tmp_path):
    from ftn.data.fixtures import write_domainnet_fixture
    from ftn.training.runner import run_experiment

    with pytest.raises(ConfigError, match="data.root is required"):
        load_config(ROOT / "configs" / "domainnet_resnet34_r40.yaml")
    cfg = load_config(ROOT / "configs" / "domainnet_resnet34_r40.yaml", ["data.root=unused"])
    assert cfg.model.backbone == "resnet34" and cfg.method.rank == 40 and len(cfg.data.domains) == 6
    write_domainnet_fixture(tmp_path / "dn", domains=cfg.data.domains, classes=3, per_class=4, size=32)
    cfg = load_config(ROOT / "configs" / "domainnet_resnet34_r40.yaml", [
        f"data.root={tmp_path / 'dn'}", "model.pretrained=false", "train.max_steps=2", "data.image_size=32",
        "data.num_workers=0", "data.batch_size=4", f"output_dir={tmp_path / 'out'}", "train.warmup_steps=1",
        "train.recalibrate_batches=1", "data.val_fraction=0.25"])
    summary = run_experiment(cfg, progress=False)
    assert list(summary["domains"]) == cfg.data.domains
    assert all(r["steps"] == 2 for r in summary["domains"].values())
    adapters = sorted(p.name for p in (tmp_path / "out" / "adapters").iterdir())
    assert adapters == sorted(f"{d}.safetensors" for d in cfg.data.domains)
    report_delta = 656_280  # rank 40 on ResNet-34, the paper's count
    assert summary["stored_parameters"] > 21_284_672 + 6 * report_delta


def test_incremental_domains_across_processes(tmp_path):
    """Domain 1 trained in one process; a second process loads its adapter, adds and trains
    domain 2; domain 1's predictions stay bit-identical."""
    common = ["model.pretrained=false", "data.image_size=32", "data.train_limit=32", "data.val_limit=16",
              "data.test_limit=16", "train.max_steps=2", "data.batch_size=16", "method.rank=2",
              "train.recalibrate_batches=1", "train.warmup_steps=0"]
    cli = [sys.executable, "-m", "ftn.cli", "train", "--no-progress"]
    subprocess.run([*cli, *common, "data.domains=[mnist]", f"output_dir={tmp_path / 'one'}"], check=True,
                   capture_output=True)
    first = tmp_path / "one" / "adapters" / "mnist.safetensors"
    subprocess.run([*cli, *common, "data.domains=[fashion]", f"output_dir={tmp_path / 'two'}",
                    f"method.load_adapters=[{first}]"], check=True, capture_output=True)
    summary = json.loads((tmp_path / "two" / "results.json").read_text())
    assert summary["loaded_domains"] == ["mnist"] and list(summary["domains"]) == ["fashion"]

    from ftn.backbones import build_backbone
    from ftn import FTNModel
    from ftn.data.multidomain import MultiDomainDataset
    from ftn.training.engine import seed_everything

    x, _ = MultiDomainDataset("mnist", "test", image_size=32).as_tensors()
    x = x[:16]
    outputs = []
    for adapters in ([first], [first, tmp_path / "two" / "adapters" / "fashion.safetensors"]):
        seed_everything(0)  # as `ftn train` does before building the (random-weight) backbone
        backbone, _ = build_backbone("mobilenet_v2", pretrained=False)
        model = FTNModel(backbone, rank=2).eval()
        for a in adapters:
            model.load_task(a)  # the fingerprint check proves it is the same backbone
        with torch.no_grad():
            outputs.append(model(x, task="mnist"))
    assert torch.equal(outputs[0], outputs[1])


def test_ftn_eval_reproduces_test_accuracy_from_adapters(tmp_path, capsys):
    from ftn.cli import main

    args = ["model.backbone=tiny_convnet", "model.pretrained=false", "data.image_size=16", "data.train_limit=32",
            "data.val_limit=16", "data.test_limit=40", "train.max_steps=3", "data.batch_size=8",
            "data.domains=[mnist,optdigits]", f"output_dir={tmp_path}", "train.recalibrate_bn=false"]
    assert main(["train", "--no-progress", *args]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    capsys.readouterr()
    assert main(["eval", *args, "--adapters", str(tmp_path / "adapters")]) == 0
    out = capsys.readouterr().out
    for domain in ("mnist", "optdigits"):
        assert f"{domain:<16} test top-1 {results['domains'][domain]['test_acc']:.2f}%" in out
    assert main(["eval", *args, "--adapters", str(tmp_path / "nothing")]) == 2
