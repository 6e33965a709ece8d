"""A dense task is one record: a toy task registered here, and nowhere else, loads from the NYUD
folder, survives augmentation, gets a head with its channels, trains with its loss, is scored by
its meter, counts in Δm and is written as an image by ``ftn predict`` (CPU, random weights)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ftn.core.errors import ConfigError
from ftn.settings.dense import DenseTask, TableColumn, register_dense_task, unregister_dense_task
from ftn.settings.dense.nyud import NYUDMultiTask
from ftn.settings.dense.setting import compare
from ftn.settings.dense.tasks import TASKS, dense_task_names, prediction_image, read_map
from ftn.training.runner import build, run_experiments

from helpers import tiny_dense_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

TOY = "nearness"


# ---- the toy task: 1 / (1 + depth) per pixel, read from the depth label (0 where depth is invalid)

def _read_nearness(path: Path, dataset) -> torch.Tensor:
    d = read_map(path, "depth").astype(np.float32)
    valid = np.isfinite(d) & (d > 0)
    return torch.from_numpy(np.where(valid, 1.0 / (1.0 + np.where(valid, d, 0.0)), 0.0).astype(np.float32))[None]


def _nearness_loss(pred: torch.Tensor, target: torch.Tensor, d) -> torch.Tensor:
    valid = target > 0
    return ((pred - target) ** 2 * valid).sum() / valid.sum().clamp_min(1)


class AbsErrorMeter:
    """Mean absolute error over valid pixels, pooled over the dataset (the meter protocol:
    per-image statistics that sum to what ``update`` adds)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total = np.zeros(2)

    def stats_width(self) -> int:
        return 2

    def image_stats(self, pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:
        valid = target > 0
        err = ((pred - target).abs() * valid).flatten(1).sum(1)
        return torch.stack([valid.flatten(1).sum(1).double(), err.double()], 1).numpy()

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.total += self.image_stats(pred, target).sum(0)

    def from_stats(self, total: np.ndarray) -> dict[str, float]:
        return {"mae": float(total[1] / max(total[0], 1.0)), "n_valid": float(total[0])}

    def compute(self) -> dict[str, float]:
        return self.from_stats(self.total)


def _nearness_image(p: torch.Tensor) -> Image.Image:
    return Image.fromarray((p[0].clamp(0, 1) * 255).round().byte().numpy(), mode="L")


@pytest.fixture
def toy_task():
    task = register_dense_task(DenseTask(
        name=TOY, folder="depth", suffix=".npy", read=_read_nearness, labels=("nearness",),
        loss=_nearness_loss, loss_weight=2.0, meter=lambda c, d: AbsErrorMeter(), reported=("mae",), main="mae",
        directions={"mae": -1}, table=(TableColumn("MAE ↓", "mae", 1, 3),), image=_nearness_image))
    yield task
    unregister_dense_task(TOY)
    assert dense_task_names() == TASKS  # the other tests see the four NYUD tasks only


def test_a_registered_task_trains_scores_and_counts_in_delta_m(toy_task, scenes: Path, tmp_path: Path) -> None:
    cfg = tiny_dense_config(scenes, tmp_path / "probe")
    assert cfg.data.tasks == [*TASKS, TOY]  # registered tasks are the default task list
    assert cfg.data.loss_weights[TOY] == 2.0

    sample = NYUDMultiTask(scenes, "val", [TOY])[0]
    assert sample[TOY].shape == (1, 32, 48) and float(sample[TOY].max()) <= 1.0

    variants = {"single": ["method.name=full"], "mtl": ["method.name=full", "data.joint=true"]}
    cfgs = [tiny_dense_config(scenes, tmp_path / v, f"data.tasks=[depth,{TOY}]", *o) for v, o in variants.items()]
    runs = compare(dict(zip(variants, run_experiments(cfgs, progress=False))), baseline="single")
    for run in runs.values():
        assert run["main_metrics"] == {"depth": "rmse", TOY: "mae"}
        assert math.isfinite(run["metrics"][TOY]["mae"]) and set(run["metrics"][TOY]) == {"mae"}
        assert TOY in run["delta_per_task"]
    single, mtl = runs["single"], runs["mtl"]
    base = single["metrics"]
    expect = -((mtl["metrics"]["depth"]["rmse"] - base["depth"]["rmse"]) / base["depth"]["rmse"]
               + (mtl["metrics"][TOY]["mae"] - base[TOY]["mae"]) / base[TOY]["mae"]) / 2
    assert mtl["delta_m"] == pytest.approx(expect)  # lower MAE is better, as its record says

    setting, _ = build(cfgs[0], torch.device("cpu"))
    assert setting.gain_metrics()[TOY] == (f"{TOY}/mae", -1)
    data = setting.data(TOY)
    assert data.info["labels"] == ["nearness"] and data.info["outputs"]["task"] == TOY
    head = setting.head(data)
    with torch.no_grad():
        out = head(setting.encoder.eval()(torch.zeros(2, 3, 32, 48)))
    assert out[TOY].shape == (2, 1, 32, 48)  # one channel, from the record's labels

    img = prediction_image(TOY, torch.full((1, 4, 4), 0.5))  # what `ftn predict` writes
    assert img.mode == "L" and np.array(img).max() == 128


def test_registering_checks_the_record(toy_task) -> None:
    with pytest.raises(ConfigError, match="already registered"):
        register_dense_task(toy_task)
    with pytest.raises(ConfigError, match="main metric"):
        register_dense_task(DenseTask(name="other", folder="depth", suffix=".npy", read=_read_nearness,
                                      loss=_nearness_loss, meter=lambda c, d: AbsErrorMeter(), reported=("mae",),
                                      main="rmse", directions={"rmse": -1}))
    with pytest.raises(ConfigError, match="cannot name"):
        register_dense_task(DenseTask(name="all", folder="depth", suffix=".npy", read=_read_nearness,
                                      loss=_nearness_loss, meter=lambda c, d: AbsErrorMeter(), reported=("mae",),
                                      main="mae", directions={"mae": -1}))
