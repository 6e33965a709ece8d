"""Thousands of tasks in one process: the catalog lists every adapter of the folder, a bounded
set is loaded (resident), LRU by use with limits by count and by bytes; a request for a task
that is not resident loads it; answers are each task's own model's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ftn import FTNModel
from ftn.apps.serving.loadtest import clone_adapters
from ftn.apps.serving.registry import TaskService

from helpers import SmallCNN, randomize_norms

# Tiny tensors: one torch thread (see the fixture) keeps a cold load at milliseconds on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def small_model() -> FTNModel:
    torch.manual_seed(0)
    return FTNModel(randomize_norms(SmallCNN()), rank=2).eval()


def generate_adapters(folder, count: int, seed: int = 0) -> list[str]:
    """``count`` adapters of the small model, each with its own random factors and head."""
    model = small_model()
    model.add_task("base", head=nn.Linear(16, 4))
    template = model.save_task("base", folder.parent / "template.safetensors", info={"labels": list("abcd")})
    names = [f"task{i:04d}" for i in range(count)]
    clone_adapters(template, folder, names, seed=seed)
    return names


def task_tensor_bytes(model: FTNModel) -> int:
    """Bytes of every tensor the model holds beyond the backbone's (factors, norm copies, heads)."""
    return sum(t.nbytes for t in model.state_dict().values()) - BACKBONE_BYTES


BACKBONE_BYTES = sum(t.nbytes for t in small_model().state_dict().values())


def reference_answer(folder, name, x):
    model = small_model()
    model.load_task(folder / f"{name}.safetensors")
    with torch.no_grad():
        return model(x[None], task=name)[0]


def inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 16, 16, generator=g) for _ in range(n)]


@pytest.mark.slow  # 1,000 cold loads: about 40 s on a busy 2-core machine
def test_a_thousand_tasks_serve_from_one_process_within_the_resident_bound(tmp_path):
    folder = tmp_path / "adapters"
    folder.mkdir()
    names = generate_adapters(folder, 1000)
    service = TaskService(small_model(), folder, max_resident=16, hot_tasks=4)
    loaded_while_over = []
    service.on_load = lambda task, reason, s: loaded_while_over.append(task) if len(service.resident) > 16 else None
    changes = service.load_folder()
    assert len(changes["added"]) == 1000 and not changes["failed"]
    assert len(service.catalog) == 1000 and service.resident == names[:16]  # filled to the limit at start
    per_task = service.catalog[names[0]].tensor_bytes
    assert per_task > 0 and all(e.tensor_bytes == per_task for e in service.catalog.values())

    # every task answered once, 8 tasks per batch, in a shuffled order
    order = [names[i] for i in torch.randperm(1000, generator=torch.Generator().manual_seed(1)).tolist()]
    xs = inputs(8)
    answers = {}
    for start in range(0, 1000, 8):
        batch = order[start:start + 8]
        out = service.run_batch(batch, xs[:len(batch)])
        answers.update({t: (x, y) for t, x, y in zip(batch, xs, out)})
        # memory is the backbone + the resident set, however many tasks were served so far
        assert len(service.resident) <= 16 and service.resident_bytes == len(service.resident) * per_task
        assert set(service.model.tasks) == set(service.resident)
        assert task_tensor_bytes(service.model) == service.resident_bytes
    assert not loaded_while_over
    assert all(isinstance(y, torch.Tensor) for _, y in answers.values()) and len(answers) == 1000
    cold = service.loads["request"]
    assert cold >= 1000 - 16 and service.evictions == service.loads["start"] + cold - 16
    for name in names[::97]:  # a spread of tasks: the same answer as the task's own model
        x, y = answers[name]
        torch.testing.assert_close(y, reference_answer(folder, name, x), atol=1e-5, rtol=1e-5)
    # the last batch's tasks are the most recently used, so they are resident, in use order
    assert service.resident[-8:] == order[-8:]


def test_eviction_is_least_recently_used_and_a_cold_task_loads_on_request(tmp_path):
    folder = tmp_path / "adapters"
    folder.mkdir()
    a, b, c, d = generate_adapters(folder, 4)
    service = TaskService(small_model(), folder, max_resident=3)
    assert service.load_folder()["added"] == [a, b, c, d]
    assert service.resident == [a, b, c] and service.loads == {"start": 3}
    x = inputs(1)
    service.run_batch([a], x)  # a becomes the most recently used
    assert service.resident == [b, c, a]
    out = service.run_batch([d], x)  # d is not resident: loaded, evicting b (least recently used)
    assert service.resident == [c, a, d] and service.loads["request"] == 1 and service.evictions == 1
    torch.testing.assert_close(out[0], reference_answer(folder, d, x[0]), atol=1e-5, rtol=1e-5)
    service.run_batch([b], x)
    assert service.resident == [a, d, b]  # c was the least recently used
    assert service.residency() == {"resident": 3, "resident_bytes": 3 * service.catalog[a].tensor_bytes,
                                   "max_resident": 3, "max_resident_bytes": 0,
                                   "loads": {"start": 3, "request": 2}, "evictions": 2}


def test_byte_limit_and_batches_with_more_tasks_than_may_be_resident(tmp_path):
    folder = tmp_path / "adapters"
    folder.mkdir()
    names = generate_adapters(folder, 6)
    per_task = TaskService(small_model(), folder).load_folder() and None
    service = TaskService(small_model(), folder, max_resident_bytes=1)
    changes = service.load_folder()  # every adapter is larger than 1 byte: none can ever be resident
    assert changes["added"] == [] and "more than the resident limit of 1 bytes" in changes["failed"][f"{names[0]}.safetensors"]

    probe = TaskService(small_model(), folder, max_resident=1)
    probe.load_folder()
    per_task = probe.catalog[names[0]].tensor_bytes
    service = TaskService(small_model(), folder, max_resident_bytes=2 * per_task + per_task // 2)
    service.load_folder()
    assert service.resident == names[:2]
    peak = []
    service.on_load = lambda task, reason, s: peak.append(service.resident_bytes)
    xs = inputs(6)
    out = service.run_batch(names[::-1], xs)  # 6 tasks, 2 may be resident: run in 3 parts
    assert max(peak) <= 2 * per_task + per_task // 2 and len(service.resident) == 2
    for name, x, y in zip(names[::-1], xs, out):
        torch.testing.assert_close(y, reference_answer(folder, name, x), atol=1e-5, rtol=1e-5)


def test_a_file_whose_tensors_are_corrupt_fails_its_requests_and_is_listed(tmp_path):
    """Scanned from its header (intact), the task is listed; loading it finds the bad checksum:
    its requests fail with the reason, the others are answered, and it moves to ``skipped``."""
    folder = tmp_path / "adapters"
    folder.mkdir()
    a, b = generate_adapters(folder, 2)
    data = bytearray((folder / f"{b}.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (folder / f"{b}.safetensors").write_bytes(bytes(data))
    service = TaskService(small_model(), folder, max_resident=1)
    assert service.load_folder()["added"] == [a, b]
    out = service.run_batch([a, b], inputs(2))
    assert isinstance(out[0], torch.Tensor) and "checksum" in str(out[1])
    assert b not in service.catalog and "checksum" in service.skipped[f"{b}.safetensors"]
    assert service.sync_folder() == {"added": [], "removed": [], "failed": {}}  # not retried until it changes


def test_parameter_counts_from_the_header_equal_the_loaded_tasks_report(tmp_path):
    folder = tmp_path / "adapters"
    folder.mkdir()
    (name,) = generate_adapters(folder, 1)
    service = TaskService(small_model(), folder, max_resident=1)
    service.load_folder()
    report = service.model.parameter_report().tasks[name]
    assert service.catalog[name].parameters == {
        "delta": report.delta, "norms": report.norms, "norm_buffers": report.norm_buffers, "head": report.head,
        "total": report.delta + report.norms + report.head}


@pytest.mark.parametrize("limits", [{"max_resident": -1}, {"max_resident_bytes": -5}])
def test_negative_limits_are_refused(tmp_path, limits):
    from ftn import ConfigError

    with pytest.raises(ConfigError, match="must be >= 0"):
        TaskService(small_model(), tmp_path, **limits)
