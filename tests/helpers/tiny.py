"""Small in-memory tasks and methods shared by the harness tests."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from ftn.training.config import DataConfig, MethodConfig, TrainConfig
from ftn.training.engine import train_task
from ftn.training.methods import make_method
from ftn.training.setting import Classify, TaskData

from helpers import SmallCNN, randomize_norms

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
