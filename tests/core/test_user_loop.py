"""FTNModel inside a user's own training loop: DistributedDataParallel (gloo, 2 processes),
torch.compile, and a state_dict round trip of a multi-task model."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import ftn
from helpers import SmallCNN, randomize_norms
from ftn import FTNModel


def _model() -> FTNModel:
    torch.manual_seed(0)
    model = FTNModel(randomize_norms(SmallCNN()), rank=2)
    model.add_task("a", head=nn.Linear(16, 3))
    model.add_task("b", head=nn.Linear(16, 3))
    with torch.no_grad():  # non-zero ΔW so that every factor gets a gradient
        for name in model.tasks:
            for p in model.task_parameters(name):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    return model.train()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 3, (4,), generator=g)


def _grads(model: FTNModel, x: torch.Tensor, y: torch.Tensor, module: nn.Module) -> dict[str, torch.Tensor]:
    nn.functional.cross_entropy(module(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_task_parameters("a")}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = _model().eval()  # BatchNorm on running statistics: half batches = the whole batch
        ddp = nn.parallel.DistributedDataParallel(model.for_task("a"), find_unused_parameters=False)
        x, y = _batch()
        part = slice(2 * rank, 2 * rank + 2)  # each process half of the batch
        for _ in range(2):  # a second step is where DDP complains about unused parameters
            ddp.zero_grad()
            grads = _grads(model, x[part], y[part], ddp)
        untouched = all(p.grad is None for p in model.task_parameters("b"))
        frozen = all(p.grad is None for p in model.frozen_tensors().values())
        if rank == 0:
            torch.save({"grads": grads, "untouched": untouched, "frozen": frozen}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_ddp_trains_one_task_with_the_single_process_gradients(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
    result = torch.load(out)
    assert result["untouched"] and result["frozen"]
    model = _model().eval()
    x, y = _batch()
    # DDP averages the two halves' gradients: the mean loss over the whole batch.
    expected = _grads(model, x, y, model.for_task("a"))
    assert result["grads"].keys() == expected.keys() and expected
    for name, grad in expected.items():
        torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_single_task_view_holds_exactly_the_tasks_tensors():
    model = _model()
    view = model.for_task("a")
    assert isinstance(view, ftn.SingleTaskView)
    assert {id(p) for p in view.parameters()} == {id(p) for p in model.task_parameters("a")}
    task_buffers = {id(b) for n in model.task_norm_layers().values() for b in n.tasks["a"].buffers()}
    assert {id(b) for b in view.buffers()} == task_buffers
    x, _ = _batch()
    view.eval()
    assert not model.training
    torch.testing.assert_close(view(x), model(x, task="a"))


def test_the_old_name_of_the_single_task_view_names_the_new_one():
    with pytest.raises(ImportError, match="ftn.SingleTaskView"):
        ftn.TaskModel  # noqa: B018
    with pytest.raises(ImportError, match="ftn.SingleTaskView"):
        from ftn import TaskModel  # noqa: F401
    assert not hasattr(ftn, "NoSuchName")


def test_torch_compile_matches_eager():
    model = _model().eval()
    x, _ = _batch()
    with torch.no_grad():
        eager = model(x, task="a")
        compiled = torch.compile(model.for_task("a"), backend="aot_eager", fullgraph=False)
        torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
    model.train()
    compiled = torch.compile(model.for_task("b"), backend="aot_eager")
    loss = compiled(x).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.task_parameters("b"))
    assert all(p.grad is None for p in model.task_parameters("a"))


def test_state_dict_round_trip_of_a_multi_task_model():
    model = _model().eval()
    state = model.state_dict()
    assert any(".tasks.a." in k for k in state) and any(".tasks.b." in k for k in state)
    torch.manual_seed(1)  # other factor initialisations and head weights
    other = FTNModel(randomize_norms(SmallCNN()), rank=2)
    other.add_task("a", head=nn.Linear(16, 3))
    other.add_task("b", head=nn.Linear(16, 3))
    other.eval()
    x, _ = _batch()
    assert not torch.allclose(other(x, task="a"), model(x, task="a"))
    result = other.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    for name in ("a", "b"):
        torch.testing.assert_close(other(x, task=name), model(x, task=name), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        FTNModel(SmallCNN(), rank=2).load_state_dict(state)  # a model without the tasks
