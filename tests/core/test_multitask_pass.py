"""All tasks in one pass (ftn.core.multitask) gives what the per-task loop gives."""

import pytest
import torch
import torchvision
from torch import nn

from ftn import FTNModel
from ftn.training.backbones import strip_classifier
from ftn.core.norms import task_batchnorms
from ftn.core.multitask import MultiTaskBackbone, UnsupportedForStacking, forward_all_tasks

from helpers import SmallCNN


def _model(arch, num_tasks=3, seed=0, **options):
    torch.manual_seed(seed)
    backbone, dim = strip_classifier(getattr(torchvision.models, arch)(weights=None))
    model = FTNModel(backbone, rank=4, **options)
    for i in range(num_tasks):
        model.add_task(f"t{i}", head=nn.Linear(dim, 5))
        with torch.no_grad():  # tasks must differ, or a mix-up between them would go unnoticed
            for p in model.task_parameters(f"t{i}"):
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _loop(model, x, tasks):
    return {t: model(x, task=t) for t in tasks}


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
@torch.no_grad()
def test_one_pass_matches_loop_on_torchvision_models(arch):
    model = _model(arch)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    expected = _loop(model, x, model.tasks)
    got = forward_all_tasks(model, x, fallback=False)
    assert list(got) == model.tasks
    for t in model.tasks:
        torch.testing.assert_close(got[t], expected[t], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got["t0"], got["t1"])  # really different tasks


@torch.no_grad()
def test_subset_order_partial_adaptation_and_updates_are_followed():
    # layer4 is adapted by no task and t2 skips layer3 (rank 0): those use the frozen weight.
    model = _model("resnet18", exclude=["layer4.*"])
    model.remove_task("t2")
    model.add_task("t2", head=nn.Linear(512, 5), rank_pattern={"layer3.*": 0})
    with torch.no_grad():
        for p in model.task_parameters("t2"):
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(1, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    tasks = ["t2", "t0"]
    forward_all_tasks(model, x, tasks, fallback=False)  # builds and caches stacked weights
    with torch.no_grad():  # an update after caching must be seen
        for layer in model.adapted_layers().values():
            if "t0" in layer.tasks:
                layer.tasks["t0"].factors[0].add_(0.1)
        next(iter(task_batchnorms(model, "t2"))).running_mean.add_(0.5)
    got = forward_all_tasks(model, x, tasks, fallback=False)
    expected = _loop(model, x, tasks)
    for t in tasks:
        torch.testing.assert_close(got[t], expected[t], rtol=1e-4, atol=1e-4)


def test_train_mode_and_unsupported_layers_fall_back_or_raise(images):
    model = _model("resnet18", num_tasks=2)
    model.train()
    with pytest.raises(UnsupportedForStacking, match="eval"):
        forward_all_tasks(model, images, fallback=False)
    # SmallCNN has a conv subclass with its own forward and a LayerNorm: not stackable.
    torch.manual_seed(0)
    small = FTNModel(SmallCNN(), rank=2)
    small.add_task("a")
    small.add_task("b")
    with pytest.raises(UnsupportedForStacking):
        MultiTaskBackbone(small.backbone, ["a", "b"])
    small.eval()
    with torch.no_grad():
        out = forward_all_tasks(small, images)  # falls back to the loop
        expected = _loop(small, images, ["a", "b"])
    for t in ("a", "b"):
        torch.testing.assert_close(out[t], expected[t])


def test_gradients_flow_through_one_pass():
    # Eval-mode norms, but autograd on: the stacked weights are built differentiably.
    model = _model("mobilenet_v2", num_tasks=2)
    x = torch.randn(1, 3, 32, 32)
    out = forward_all_tasks(model, x, fallback=False)
    sum(o.square().sum() for o in out.values()).backward()
    grads = [p.grad for t in model.tasks for p in model.task_parameters(t)]
    assert all(g is not None for g in grads)
    assert all(g.abs().sum() > 0 for g in grads[:3])
