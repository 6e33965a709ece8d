"""Crash safety, distributed training, hostile inputs (issue: scale out and hold up)."""

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save
from torch.utils.data import TensorDataset

from ftn import AdapterFileError, DataError, FTNError, FTNModel
from ftn.adapters import FORMAT, read_adapter
from ftn.training.config import DataConfig, TrainConfig
from ftn.training.engine import DomainData, load_checkpoint, train_domain

from conftest import SmallCNN, randomize_norms
from test_training import tiny_method

TINY = ["model.backbone=tiny_convnet", "model.pretrained=false", "data.image_size=16", "data.train_limit=64",
        "data.val_limit=32", "data.test_limit=32", "data.batch_size=8", "method.rank=2", "train.warmup_steps=0",
        "data.domains=[mnist]"]
CLI = [sys.executable, "-m", "ftn.cli", "train", "--no-progress"]


def adapter_tensors(folder: Path) -> dict:
    tensors, _ = read_adapter(folder / "adapters" / "mnist.safetensors")
    return tensors


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path):
    args = [*TINY, "train.max_steps=40", "train.checkpoint_every=3", "train.epochs=5"]
    subprocess.run([*CLI, *args, f"output_dir={tmp_path / 'clean'}"], check=True, capture_output=True)
    # Slow the victim down a little so that SIGKILL lands mid-run, after a checkpoint.
    victim = subprocess.Popen([*CLI, *args, f"output_dir={tmp_path / 'killed'}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "mnist" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "results.json").exists()
    resumed = subprocess.run([*CLI, *args, f"output_dir={tmp_path / 'killed'}"], check=True, capture_output=True,
                             text=True)
    assert "resumed mnist at step" in resumed.stderr
    clean, killed = adapter_tensors(tmp_path / "clean"), adapter_tensors(tmp_path / "killed")
    assert clean.keys() == killed.keys()
    for k in clean:
        assert torch.equal(clean[k], killed[k]), k
    import json

    a = json.loads((tmp_path / "clean" / "results.json").read_text())["domains"]["mnist"]
    b = json.loads((tmp_path / "killed" / "results.json").read_text())["domains"]["mnist"]
    assert (a["test_acc"], a["val_acc"], a["steps"]) == (b["test_acc"], b["val_acc"], b["steps"])


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_two_gloo_processes_match_single_process(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    args = [*TINY, "train.max_steps=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "ftn.cli", "train", "--no-progress", *args,
                    f"output_dir={tmp_path / 'two'}"], check=True, capture_output=True, env=env)
    subprocess.run([*CLI, *args, f"output_dir={tmp_path / 'one'}"], check=True, capture_output=True, env=env)
    one, two = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "two")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-5, atol=1e-6)
    assert any(one[k].abs().max() > 0 for k in one if k.endswith(".0"))  # the factors did train
    # Domain-parallel: each rank trains its own domain, rank 0 writes the joint results.
    subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "ftn.cli", "train", "--no-progress", *args,
                    "data.domains=[mnist,fashion]", "train.distributed=domains", f"output_dir={tmp_path / 'dom'}"],
                   check=True, capture_output=True, env=env)
    import json

    results = json.loads((tmp_path / "dom" / "results.json").read_text())
    assert list(results["domains"]) == ["mnist", "fashion"] and results["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "dom" / "adapters").iterdir()) == ["fashion.safetensors",
                                                                                  "mnist.safetensors"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/ftn_pwned",))


def test_pickle_checkpoint_carrying_code_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(pickle.dumps({"model": _Evil(), "step": 1}))
    with pytest.raises(FTNError, match="no usable checkpoint.*train.resume=false"):
        load_checkpoint(path)
    assert not Path("/tmp/ftn_pwned").exists()


def test_labels_outside_class_range_are_named(tmp_path):
    x = torch.randn(16, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 7] * 4)
    data = DomainData("digits", TensorDataset(x, y), None, None, num_classes=3)
    method = tiny_method()
    domain = method.add_domain("digits", 3)
    with pytest.raises(DataError, match=r"domain 'digits' \(train data\): labels \[7\] are outside the class range 0..2"):
        train_domain(domain, data, TrainConfig(max_steps=2), DataConfig(batch_size=8), tmp_path, progress=False)


def _model():
    torch.manual_seed(0)
    return FTNModel(randomize_norms(SmallCNN()).eval(), rank=2).eval()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=600))
def test_adapter_loader_random_bytes_never_crash(tmp_path, data):
    path = tmp_path / "random.safetensors"
    path.write_bytes(data)
    model = _MODEL
    try:
        model.load_task(path, name="fuzz")
    except AdapterFileError:
        pass
    assert "fuzz" not in model.tasks


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(meta=st.dictionaries(st.sampled_from(["format", "format_version", "task", "layers", "norms", "head",
                                              "config", "task_spec", "backbone_fingerprint", "content_sha256"]),
                            st.one_of(st.text(max_size=30), st.just("{}"), st.just("[]"), st.just("1"),
                                      st.just(FORMAT), st.just('{"stem": {"shape": [8], "rank": 1}}'))),
       keys=st.lists(st.sampled_from(["delta.stem.0", "head.weight", "norm.bn1.weight", "x"]), max_size=3))
def test_adapter_loader_random_metadata_never_half_loads(tmp_path, meta, keys):
    path = tmp_path / "meta.safetensors"
    path.write_bytes(st_save({k: torch.zeros(2, 2) for k in keys}, metadata=meta))
    model = _MODEL
    before = list(model.tasks)
    try:
        name = model.load_task(path, name="fuzz")
    except AdapterFileError:
        assert model.tasks == before
        assert all("fuzz" not in layer.tasks for layer in model.adapted_layers().values())
    else:  # only a complete, valid file may load
        assert name == "fuzz"
        model.remove_task("fuzz")


_MODEL = _model()
