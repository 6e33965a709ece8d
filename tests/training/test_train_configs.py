"""`ftn train --config` end to end for each setting's config (2 steps on fixtures), `ftn eval`
from the saved files, incremental tasks, and crash safety (SIGKILL, resume) as subprocesses."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ftn import ConfigError
from ftn.core.adapters import read_adapter
from ftn.apps.cli import main
from ftn.training.config import load_config

from helpers.tiny import CONFIGS, EMBEDDED, TINY, tiny_overrides

CLI = [sys.executable, "-m", "ftn.apps.cli", "train", "--no-progress"]
def test_train_without_config_prints_what_it_needs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    assert main(["train", f"output_dir={tmp_path / 'out'}"]) == 2
    out = capsys.readouterr().out
    assert "--config" in out and "classification, dense, text" in out and "norm_head" in out
    assert "configs/nyud_resnet18_r30.yaml" in out and "configs/text_minilm.yaml" in out
    assert not (tmp_path / "out").exists()  # nothing was trained


def test_every_config_loads_in_its_setting():
    settings = {c.name: load_config(c, ["data.root=unused"] if "domainnet" in c.name or "nyud" in c.name else []).setting
                for c in sorted(CONFIGS.glob("*.yaml"))}
    assert settings == {"domainnet_resnet34_r40.yaml": "classification", "embedded_mobilenetv2_ftn.yaml": "classification",
                        "nyud_resnet18_r30.yaml": "dense", "text_minilm.yaml": "text",
                        "vit_b16_domainnet.yaml": "classification"}
    with pytest.raises(ConfigError, match="data.root is required"):
        load_config(CONFIGS / "domainnet_resnet34_r40.yaml")


@pytest.mark.slow
def test_paper_domainnet_config_runs_two_steps_on_fixture(tmp_path):
    from ftn.settings.classification.fixtures import write_domainnet_fixture

    config = CONFIGS / "domainnet_resnet34_r40.yaml"
    cfg = load_config(config, ["data.root=unused"])
    assert cfg.model.backbone == "resnet34" and cfg.method.ftn.rank == 40 and len(cfg.data.domains) == 6
    write_domainnet_fixture(tmp_path / "dn", domains=cfg.data.domains, classes=3, per_class=4, size=32)
    assert main(["train", "--no-progress", "--config", str(config),
                 f"data.root={tmp_path / 'dn'}", "model.pretrained=false", "train.max_steps=2", "data.image_size=32",
                 "data.num_workers=0", "data.batch_size=4", f"output_dir={tmp_path / 'out'}", "train.warmup_steps=1",
                 "train.recalibrate_batches=1", "data.val_fraction=0.25"]) == 0
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(summary["tasks"]) == cfg.data.domains
    assert all(r["steps"] == 2 for r in summary["tasks"].values())
    adapters = sorted(p.name for p in (tmp_path / "out" / "adapters").iterdir())
    assert adapters == sorted(f"{d}.safetensors" for d in cfg.data.domains)
    report_delta = 656_280  # rank 40 on ResNet-34, the paper's count
    assert summary["parameters"]["shared"] == 21_284_672
    assert summary["stored_parameters"] > 21_284_672 + 6 * report_delta


@pytest.mark.slow
def test_vit_b16_domainnet_config_runs_two_steps_on_fixture(tmp_path):
    """configs/vit_b16_domainnet.yaml with random weights on a one-domain DomainNet fixture:
    vit_b_16 needs 224×224 images, so the fixture is tiny (2 classes, batch 2)."""
    from ftn.settings.classification.fixtures import write_domainnet_fixture

    config = CONFIGS / "vit_b16_domainnet.yaml"
    cfg = load_config(config, ["data.root=unused"])
    assert cfg.model.backbone == "vit_b_16" and cfg.data.image_size == 224 and len(cfg.data.domains) == 6
    write_domainnet_fixture(tmp_path / "dn", domains=["sketch"], classes=2, per_class=4, size=32)
    assert main(["train", "--no-progress", "--config", str(config),
                 f"data.root={tmp_path / 'dn'}", "data.domains=[sketch]", "model.pretrained=false",
                 "train.max_steps=2", "data.num_workers=0", "data.batch_size=2", "data.eval_batch_size=4",
                 f"output_dir={tmp_path / 'out'}", "train.warmup_steps=1", "data.val_fraction=0.25",
                 "train.amp=off"]) == 0
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(summary["tasks"]) == ["sketch"] and summary["tasks"]["sketch"]["steps"] == 2
    assert sorted(p.name for p in (tmp_path / "out" / "adapters").iterdir()) == ["sketch.safetensors"]
    # 12 MHA blocks (in_proj + out_proj) and 24 MLP Linears at rank 16, the patch conv, the LNs
    per_domain = summary["stored_parameters"] - 85_798_656  # ViT-B/16 without its classifier
    assert per_domain > 16 * 12 * ((2304 + 768) + (768 + 768) + 2 * (3072 + 768))


@pytest.mark.slow
def test_paper_nyud_config_runs_two_steps_on_a_fixture_and_evaluates(scenes, tmp_path, capsys):
    config = CONFIGS / "nyud_resnet18_r30.yaml"
    args = ["--config", str(config), f"data.root={scenes}", "model.pretrained=false", "data.crop=[32,48]",
            "data.batch_size=2", "data.num_workers=0", "train.device=cpu", "train.recalibrate_batches=1",
            f"output_dir={tmp_path}"]
    assert main(["train", "--no-progress", *args, "train.max_steps=2"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["setting"] == "dense" and results["method"] == "ftn"
    assert {t: r["steps"] for t, r in results["tasks"].items()} == {"semseg": 2, "depth": 2, "normals": 2, "edge": 2}
    assert set(results["metrics"]) == {"semseg", "depth", "normals", "edge"}
    for task, metrics in results["metrics"].items():
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), (task, metrics)
    p = results["parameters"]
    assert p["shared"] == 11_176_512  # ResNet-18 convs + BN affine, fc removed
    assert results["stored_parameters"] == p["shared"] + sum(p["per_task"].values())
    assert sorted(f.name for f in (tmp_path / "adapters").iterdir()) == [
        "depth.safetensors", "edge.safetensors", "normals.safetensors", "semseg.safetensors"]
    capsys.readouterr()
    assert main(["eval", *args, "--adapters", str(tmp_path / "adapters" / "depth.safetensors")]) == 0
    rmse = results["metrics"]["depth"]["rmse"]
    assert f"depth            test depth/rmse {rmse:.4f}" in capsys.readouterr().out


@pytest.mark.slow
def test_text_config_runs_two_steps_and_evaluates(tmp_path, capsys):
    config, overrides = tiny_overrides("text", tmp_path)
    args = ["--config", str(config), *overrides, f"output_dir={tmp_path / 'out'}"]
    assert main(["train", "--no-progress", *args]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["setting"] == "text" and list(results["tasks"]) == ["sentiment", "tweets"]
    assert results["task_sizes"]["sentiment"] == {"classes": 2, "train": 16, "test": 16, "max_len": 16}
    capsys.readouterr()
    assert main(["eval", *args, "--adapters", str(tmp_path / "out" / "adapters")]) == 0
    out = capsys.readouterr().out
    for task, r in results["tasks"].items():
        assert f"{task:<16} test top-1 {r['test']['acc']:.2f}%" in out


def test_ftn_eval_reproduces_test_accuracy_from_adapters(tmp_path, capsys):
    args = ["--config", str(EMBEDDED), "model.backbone=tiny_convnet", "model.pretrained=false", "data.image_size=16",
            "data.train_limit=32", "data.val_limit=16", "data.test_limit=40", "train.max_steps=3",
            "data.batch_size=8", "data.domains=[mnist,optdigits]", f"output_dir={tmp_path}"]
    assert main(["train", "--no-progress", *args]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    capsys.readouterr()
    assert main(["eval", *args, "--adapters", str(tmp_path / "adapters")]) == 0
    out = capsys.readouterr().out
    for domain in ("mnist", "optdigits"):
        assert f"{domain:<16} test top-1 {results['tasks'][domain]['test']['acc']:.2f}%" in out
    assert main(["eval", *args, "--adapters", str(tmp_path / "nothing")]) == 2


@pytest.mark.slow
def test_incremental_domains_across_processes(tmp_path):
    """Domain 1 trained in one process; a second process loads its adapter, adds and trains
    domain 2; domain 1's predictions stay bit-identical."""
    common = ["--config", str(EMBEDDED), "model.pretrained=false", "data.image_size=32", "data.train_limit=32",
              "data.val_limit=16", "data.test_limit=16", "train.max_steps=2", "data.batch_size=16",
              "method.ftn.rank=2", "train.recalibrate_batches=1", "train.warmup_steps=0"]
    subprocess.run([*CLI, *common, "data.domains=[mnist]", f"output_dir={tmp_path / 'one'}"], check=True,
                   capture_output=True)
    first = tmp_path / "one" / "adapters" / "mnist.safetensors"
    subprocess.run([*CLI, *common, "data.domains=[fashion]", f"output_dir={tmp_path / 'two'}",
                    f"method.load_adapters=[{first}]"], check=True, capture_output=True)
    summary = json.loads((tmp_path / "two" / "results.json").read_text())
    assert summary["loaded_tasks"] == ["mnist"] and list(summary["tasks"]) == ["fashion"]
    assert set(summary["parameters"]["per_task"]) == {"mnist", "fashion"}  # stored: both tasks

    from ftn import FTNModel
    from ftn.training.backbones import build_backbone
    from ftn.settings.classification.multidomain import MultiDomainDataset
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


# ----------------------------------------------------------------------------- crash safety
def _tensors(path: Path) -> dict:
    return read_adapter(path)[0]


def _kill_after_checkpoint(cmd: list[str], ckpt: Path, results: Path, env: dict | None = None) -> None:
    victim = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not results.exists()


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path):
    args = ["--config", str(EMBEDDED), *TINY, "train.max_steps=40", "train.checkpoint_every=3", "train.epochs=5"]
    subprocess.run([*CLI, *args, f"output_dir={tmp_path / 'clean'}"], check=True, capture_output=True)
    _kill_after_checkpoint([*CLI, *args, f"output_dir={tmp_path / 'killed'}"],
                           tmp_path / "killed" / "mnist" / "checkpoint.pt", tmp_path / "killed" / "results.json")
    resumed = subprocess.run([*CLI, *args, f"output_dir={tmp_path / 'killed'}"], check=True, capture_output=True,
                             text=True)
    assert "resumed mnist at step" in resumed.stderr
    clean, killed = (_tensors(tmp_path / run / "adapters" / "mnist.safetensors") for run in ("clean", "killed"))
    assert clean.keys() == killed.keys()
    for k in clean:
        assert torch.equal(clean[k], killed[k]), k
    a, b = (json.loads((tmp_path / run / "results.json").read_text())["tasks"]["mnist"] for run in ("clean", "killed"))
    assert (a["test"], a["val"], a["steps"]) == (b["test"], b["val"], b["steps"])


@pytest.mark.slow
def test_dense_sigkill_then_resume_equals_uninterrupted_run(scenes, tmp_path):
    """The dense setting: killed mid-run (after a checkpoint of its first task), the same command
    resumes that task, trains the second, and every output equals an uninterrupted run."""
    args = ["--config", str(CONFIGS / "nyud_resnet18_r30.yaml"), f"data.root={scenes}", "data.tasks=[semseg,depth]",
            "model.backbone=mobilenet_v2", "model.pretrained=false", "model.aspp_channels=16", "model.low_channels=8",
            "model.decoder_channels=16", "data.crop=[32,48]", "data.batch_size=2", "data.num_workers=0",
            "train.device=cpu", "train.recalibrate_batches=2", "train.max_steps=12", "train.checkpoint_every=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*CLI, *args, f"output_dir={tmp_path / 'clean'}"], check=True, capture_output=True, env=env)
    _kill_after_checkpoint([*CLI, *args, f"output_dir={tmp_path / 'killed'}"],
                           tmp_path / "killed" / "semseg" / "checkpoint.pt", tmp_path / "killed" / "results.json", env)
    resumed = subprocess.run([*CLI, *args, f"output_dir={tmp_path / 'killed'}"], check=True, capture_output=True,
                             text=True, env=env)
    assert "resumed semseg at step" in resumed.stderr
    for task in ("semseg", "depth"):
        clean, killed = (_tensors(tmp_path / run / "adapters" / f"{task}.safetensors") for run in ("clean", "killed"))
        assert clean.keys() == killed.keys()
        for k in clean:
            assert torch.equal(clean[k], killed[k]), (task, k)
    a, b = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("clean", "killed"))
    assert a["metrics"] == b["metrics"] and a["stored_parameters"] == b["stored_parameters"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_two_gloo_processes_match_single_process(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    args = ["--config", str(EMBEDDED), *TINY, "train.max_steps=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "ftn.apps.cli", "train", "--no-progress", *args,
                    f"output_dir={tmp_path / 'two'}"], check=True, capture_output=True, env=env)
    subprocess.run([*CLI, *args, f"output_dir={tmp_path / 'one'}"], check=True, capture_output=True, env=env)
    one, two = (_tensors(tmp_path / run / "adapters" / "mnist.safetensors") for run in ("one", "two"))
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-5, atol=1e-6)
    assert any(one[k].abs().max() > 0 for k in one if k.endswith(".0"))  # the factors did train
    # Task-parallel: each rank trains its own domain, rank 0 writes the joint results.
    subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "ftn.apps.cli", "train", "--no-progress", *args,
                    "data.domains=[mnist,fashion]", "train.distributed=tasks", f"output_dir={tmp_path / 'dom'}"],
                   check=True, capture_output=True, env=env)
    results = json.loads((tmp_path / "dom" / "results.json").read_text())
    assert list(results["tasks"]) == ["mnist", "fashion"] and results["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "dom" / "adapters").iterdir()) == ["fashion.safetensors",
                                                                                  "mnist.safetensors"]
