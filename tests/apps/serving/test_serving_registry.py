"""The served model and its folder, in process: loading, verification, rescans, batching modes,
the hot-task weight cache and merged tasks, on a BatchNorm backbone."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from ftn import AdapterFileError, ConfigError, FTNModel, TaskError
from ftn.apps.serving.registry import TaskExists, TaskService, validate_name

from helpers import SmallCNN, randomize_norms


def bn_model():
    torch.manual_seed(0)
    return FTNModel(randomize_norms(SmallCNN()), rank=2).eval()


def write_adapters(folder, names, seed=3):
    model = bn_model()
    g = torch.Generator().manual_seed(seed)
    for name in names:
        model.add_task(name, head=nn.Linear(16, 4))
        with torch.no_grad():
            for key, p in model.named_task_parameters(name):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
            for norm in model.task_norm_layers().values():  # distinct running statistics per task
                for b in norm.tasks[name].buffers():
                    if b.dtype.is_floating_point:
                        b.mul_(1.5).add_(0.1)
        model.save_task(name, folder / f"{name}.safetensors", info={"labels": list("abcd")})
    return model


@pytest.fixture
def setup(tmp_path):
    folder = tmp_path / "adapters"
    reference = write_adapters(folder, ["a", "b", "c"])
    service = TaskService(bn_model(), folder, hot_tasks=2)
    assert service.load_folder()["added"] == ["a", "b", "c"]
    return service, reference, folder


def inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 16, 16, generator=g) for _ in range(n)]


@pytest.mark.parametrize("batching", ["subbatch", "mixed"])
def test_batches_give_each_request_its_tasks_eval_mode_answer(setup, batching):
    service, reference, _ = setup
    service.batching = batching
    xs = inputs(7)
    tasks = ["a", "b", "a", "c", "b", "a", "c"]
    out = service.run_batch(tasks, xs)
    with torch.no_grad():
        for t, x, y in zip(tasks, xs, out):
            # one sample alone, in eval mode: a BatchNorm left in train mode would differ (or fail)
            torch.testing.assert_close(y, reference(x[None], task=t)[0], atol=1e-5, rtol=1e-5)


def test_hot_task_cache_is_bounded_and_merged_tasks_answer_the_same(setup):
    service, reference, _ = setup
    service.batching = "subbatch"
    xs = inputs(3)
    for t in ["a", "b", "c", "a"]:
        service.run_batch([t] * 3, xs)
    cached = {t for layer in service.model.adapted_layers().values() for t in layer.cached_tasks()}
    assert cached == {"c", "a"}  # LRU of 2: b was evicted, and with it its dense W + ΔW
    service.merged_capacity = 1
    for _ in range(20):
        service.run_batch(["a"] * 3, xs)
    assert list(service._merged) == ["a"]
    out = service.run_batch(["a"] * 3, xs)
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(out), reference(torch.stack(xs), task="a"), atol=1e-5, rtol=1e-5)


def test_unknown_task_in_a_batch_fails_only_that_request(setup):
    service, _, _ = setup
    out = service.run_batch(["a", "gone"], inputs(2))
    assert isinstance(out[1], TaskError) and isinstance(out[0], torch.Tensor)


def test_add_verifies_before_writing_and_remove_deletes(setup, tmp_path):
    service, _, folder = setup
    data = (folder / "a.safetensors").read_bytes()
    with pytest.raises(TaskExists):
        service.add("a", data)
    with pytest.raises(AdapterFileError, match="the uploaded adapter"):
        service.add("d", data[:-10])  # truncated
    with pytest.raises(ConfigError, match="invalid task name"):
        service.add("../d", data)
    assert sorted(os.listdir(folder)) == ["a.safetensors", "b.safetensors", "c.safetensors"]
    entry = service.add("d", data)
    assert entry.labels == tuple("abcd") and (folder / "d.safetensors").read_bytes() == data
    service.remove("d")
    assert "d" not in service.catalog and not (folder / "d.safetensors").exists()
    with pytest.raises(TaskError):
        service.remove("d")


def test_sync_folder_follows_other_replicas_and_reports_bad_files(setup):
    service, _, folder = setup
    other = write_adapters(folder.parent / "other", ["e"], seed=9)
    (folder / "e.safetensors").write_bytes((folder.parent / "other" / "e.safetensors").read_bytes())
    (folder / "b.safetensors").unlink()
    (folder / "junk.safetensors").write_bytes(b"not an adapter")
    (folder / "bad name.safetensors").write_bytes(b"x")
    changes = service.sync_folder()
    assert changes["added"] == ["e"] and changes["removed"] == ["b"] and list(changes["failed"]) == ["junk.safetensors"]
    assert sorted(service.catalog) == ["a", "c", "e"] and "bad name.safetensors" in service.skipped
    assert service.sync_folder() == {"added": [], "removed": [], "failed": {}}  # nothing changed since
    with torch.no_grad():
        x = inputs(1)[0]
        torch.testing.assert_close(service.run_batch(["e"], [x])[0], other(x[None], task="e")[0], atol=1e-5,
                                   rtol=1e-5)


def test_task_names_cannot_escape_the_folder():
    for bad in ["..", "../x", "a/b", ".hidden", "", "a" * 65, "a.b", "a\\b", "ä"]:
        with pytest.raises(ConfigError):
            validate_name(bad)
    assert validate_name("Task_1-b") == "Task_1-b"
