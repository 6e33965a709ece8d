"""``run_experiments``: several configs trained task by task in worker processes give the
sequential run's results, and each config is finished (its ``results.json``; its checkpoints
deleted under ``train.keep_checkpoints=false``) as soon as its own last task is done."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftn.training.config import load_config
from ftn.training.allocator import keep_freed_memory
from ftn.training.runner import run_experiments, task_order

TINY = ["model.backbone=tiny_convnet", "model.pretrained=false", "data.image_size=16", "data.domains=[mnist,fashion]",
        "train.max_steps=2", "train.epochs=1", "data.train_limit=16", "data.val_limit=8", "data.test_limit=8",
        "train.recalibrate_batches=1", "train.warmup_steps=0", "data.num_workers=0", "train.device=cpu"]


def _configs(root: Path) -> list:
    return [load_config(None, ["setting=classification", *TINY, f"method.name={m}", f"output_dir={root / m}",
                               f"train.keep_checkpoints={keep}"])
            for m, keep in (("ftn", "false"), ("full", "true"))]


@pytest.mark.slow
def test_workers_match_sequential_and_finish_each_config(tmp_path):
    sequential = run_experiments(_configs(tmp_path / "seq"), progress=False)
    parallel = run_experiments(_configs(tmp_path / "par"), progress=False, workers=2, threads=1, interleave=True)
    for one, two in zip(sequential, parallel):
        assert one["method"] == two["method"]
        for task in ("mnist", "fashion"):
            assert two["tasks"][task]["val_score"] == pytest.approx(one["tasks"][task]["val_score"])
    for root in ("seq", "par"):
        for method, kept in (("ftn", False), ("full", True)):
            out = tmp_path / root / method
            assert json.loads((out / "results.json").read_text())["method"] == method
            assert (out / "mnist" / "checkpoint.pt").is_file() == kept
            assert (out / "fashion" / "checkpoint.pt").is_file() == kept
            assert (out / "adapters" / "mnist.safetensors").is_file()


def test_task_order_config_by_config_or_round_robin():
    tasks = [["mnist", "fashion", "animal"], ["mnist"], ["mnist", "fashion"]]
    assert task_order(tasks, interleave=False) == [(0, "mnist"), (0, "fashion"), (0, "animal"), (1, "mnist"),
                                                   (2, "mnist"), (2, "fashion")]
    assert task_order(tasks, interleave=True) == [(0, "mnist"), (1, "mnist"), (2, "mnist"), (0, "fashion"),
                                                  (2, "fashion"), (0, "animal")]


def test_keep_freed_memory_takes_effect_on_glibc_linux():
    import platform
    import sys

    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is expected
    assert keep_freed_memory() is expected  # once per process: a second call changes nothing
