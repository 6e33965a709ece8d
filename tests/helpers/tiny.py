"""Small in-memory tasks and methods shared by the harness tests."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from ftn.training.config import DataConfig, MethodConfig, TrainConfig
from ftn.training.engine import train_task
from ftn.training.methods import make_method
from ftn.training.setting import Classify, TaskData

from helpers import SmallCNN, needs_minilm, randomize_norms

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


def tiny_data(n=48, classes=3, seed=0, name="d"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x[y == 1] += 0.5  # something learnable
    return TaskData(name, TensorDataset(x, y), TensorDataset(x[:16], y[:16]), TensorDataset(x[16:32], y[16:32]),
                    Classify(classes, name))


def tiny_method(name="ftn", **kw):
    torch.manual_seed(0)
    backbone = randomize_norms(SmallCNN()).eval()
    method_cfg = MethodConfig(name=name, **kw)
    method_cfg.ftn.rank = 2
    return make_method(method_cfg, backbone, torch.device("cpu"))


def bn_head():
    """A head with state beyond its parameters (BatchNorm statistics)."""
    return torch.nn.Sequential(torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 3))


def run(tmp, method_name="ftn", stop=None, train=None, data=None, method=None, head=None):
    """Train task "d" of a tiny method; returns (method, task model, result)."""
    method = method or tiny_method(method_name)
    torch.manual_seed(0)
    task = method.tasks.get("d") or method.add_task("d", head() if head else torch.nn.Linear(16, 3))
    train = train or TrainConfig(epochs=2, checkpoint_every=2, lr=1e-2)
    result = train_task(task, data or tiny_data(), train, DataConfig(batch_size=8, eval_batch_size=16), tmp,
                        seed=0, progress=False, stop_after_steps=stop)
    return method, task, result


EMBEDDED = CONFIGS / "embedded_mobilenetv2_ftn.yaml"
TINY = ["model.backbone=tiny_convnet", "model.pretrained=false", "data.image_size=16", "data.train_limit=64",
        "data.val_limit=32", "data.test_limit=32", "data.batch_size=8", "method.ftn.rank=2", "train.warmup_steps=0",
        "data.domains=[mnist]"]


def tiny_overrides(setting: str, tmp: Path) -> tuple[Path, list[str]]:
    """The cheapest 2-step run of each setting: (config file, overrides)."""
    if setting == "classification":
        return EMBEDDED, [*TINY[:-1], "data.domains=[mnist,optdigits]", "train.max_steps=2"]
    if setting == "dense":
        from ftn.settings.dense import write_nyud_layout

        root = write_nyud_layout(tmp / "scenes", n_train=4, n_val=2, size=(32, 48), seed=0, workers=1)
        return CONFIGS / "nyud_resnet18_r30.yaml", [
            f"data.root={root}", "data.tasks=[semseg,depth]", "model.backbone=mobilenet_v2", "model.pretrained=false",
            "model.aspp_channels=16", "model.low_channels=8", "model.decoder_channels=16", "data.crop=[32,48]",
            "data.batch_size=2", "data.num_workers=0", "train.max_steps=2", "train.device=cpu",
            "train.recalibrate_batches=1"]
    needs_minilm()
    return CONFIGS / "text_minilm.yaml", ["data.tasks=[sentiment,tweets]", "data.train_limit=16", "data.test_limit=16",
                                          "data.max_len=16", "train.max_steps=2"]
