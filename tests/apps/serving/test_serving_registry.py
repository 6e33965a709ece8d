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


def test_a_broken_file_that_is_removed_leaves_not_loaded(setup):
    service, _, folder = setup
    (folder / "junk.safetensors").write_bytes(b"not an adapter")
    (folder / "bad name.safetensors").write_bytes(b"x")
    service.sync_folder()
    assert set(service.skipped) == {"junk.safetensors", "bad name.safetensors"}
    (folder / "junk.safetensors").unlink()
    (folder / "bad name.safetensors").unlink()
    assert service.sync_folder() == {"added": [], "removed": [], "failed": {}}
    assert service.skipped == {}
    # a good file later written under the broken one's name is served (not remembered as failed)
    (folder / "junk.safetensors").write_bytes((folder / "a.safetensors").read_bytes())
    assert service.sync_folder()["added"] == ["junk"] and service.skipped == {}


def test_replicas_sharing_a_folder_keep_each_others_uploads_in_progress(setup, monkeypatch):
    """Replica B starting up while replica A verifies an upload must not delete A's staging file
    (A's rename would fail); a staging file left by an upload that died long ago is removed."""
    import ftn.apps.serving.registry as registry

    a, _, folder = setup
    stale = folder / ".x.safetensors.upload-otherhost-1-dead.tmp"
    stale.write_bytes(b"left by a crashed upload")
    old = os.stat(stale).st_mtime - registry.STALE_STAGING_S - 60
    os.utime(stale, (old, old))
    b = TaskService(bn_model(), folder)
    seen = []
    verify = registry.load_adapter

    def verify_while_b_starts(model, path, *args):
        if model is a.model:  # A is verifying its upload: B starts meanwhile
            seen.append(sorted(p.name for p in folder.iterdir() if p.name.startswith(".")))
            b.load_folder()
            seen.append(sorted(p.name for p in folder.iterdir() if p.name.startswith(".")))
        return verify(model, path, *args)

    monkeypatch.setattr(registry, "load_adapter", verify_while_b_starts)
    a.add("d", (folder / "a.safetensors").read_bytes())
    assert (folder / "d.safetensors").exists() and "d" in a.catalog
    staging = [n for n in seen[0] if n.startswith(".d.safetensors.upload-")]
    assert len(staging) == 1 and staging[0] in seen[1]  # B left A's upload in progress alone
    assert stale.name in seen[0] and stale.name not in seen[1]  # and removed the stale one
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # A cleaned up its own
    assert sorted(b.sync_folder()["added"]) == ["d"]  # B picks A's upload up on its next rescan


@pytest.mark.parametrize("head", [
    {"type": "Linear", "in_features": 16, "out_features": 4_000_000, "bias": True},
    {"type": "Linear", "in_features": 16, "out_features": 1e11, "bias": True},
    {"type": "Linear", "in_features": -16, "out_features": 4, "bias": True},
])
def test_an_uploaded_metadata_bomb_is_refused_and_changes_nothing(setup, head):
    import json
    import struct

    from safetensors.torch import save as st_save

    from ftn.core.adapters import read_adapter

    service, _, folder = setup
    data = (folder / "a.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8:8 + n])["__metadata__"]
    bomb = st_save(read_adapter(folder / "a.safetensors")[0], metadata={**metadata, "head": json.dumps(head)})
    before = (dict(service.catalog), service.resident, sorted(os.listdir(folder)), service.model.tasks)
    with pytest.raises(AdapterFileError, match=r"the uploaded adapter: the head's"):
        service.add("bomb", bomb)
    assert (dict(service.catalog), service.resident, sorted(os.listdir(folder)), service.model.tasks) == before
    (folder / "bomb.safetensors").write_bytes(bomb)  # the same file dropped into the folder
    assert list(service.sync_folder()["failed"]) == ["bomb.safetensors"] and "bomb" not in service.catalog
    assert service.model.tasks == before[3]
