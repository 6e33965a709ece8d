"""A batch that mixes tasks runs in one pass and equals running each task on its own samples."""

import pytest
import torch
import torchvision
from torch import nn

from ftn import ConfigError, FTNModel, ShapeError
from ftn.training.backbones import strip_classifier

from helpers import SmallCNN, randomize_norms

TASKS = ["a", "b", "a", "c", "b", "a"]


def three_task_model(backbone, dim, seed=0):
    model = FTNModel(backbone, rank=3)
    g = torch.Generator().manual_seed(seed)
    for t, classes in zip("abc", (2, 3, 4)):
        model.add_task(t, head=nn.Linear(dim, classes))
        with torch.no_grad():
            for layer in model.adapted_layers().values():
                if t in layer.tasks:
                    layer.tasks[t].factors[0].copy_(torch.randn(layer.tasks[t].factors[0].shape, generator=g) * 0.05)
            for norm in model.task_norm_layers().values():
                for p in norm.tasks[t].parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def reference(model, x, tasks):
    out = {}
    for t in dict.fromkeys(tasks):
        idx = torch.tensor([i for i, name in enumerate(tasks) if name == t])
        out[t] = model(x[idx], task=t)
    return out


@pytest.mark.parametrize("arch", ["small", "resnet18", "mobilenet_v2"])
def test_mixed_batch_equals_per_task_passes_in_eval(arch):
    torch.manual_seed(0)
    if arch == "small":
        backbone, dim, size = randomize_norms(SmallCNN()), 16, 16
    else:
        backbone, dim = strip_classifier(getattr(torchvision.models, arch)(weights=None))
        randomize_norms(backbone)
        size = 32
    model = three_task_model(backbone, dim).eval()
    x = torch.randn(len(TASKS), 3, size, size)
    with torch.no_grad():
        mixed = model.forward_mixed(x, TASKS)
        expected = reference(model, x, TASKS)
    assert list(mixed) == ["a", "b", "c"]
    for t in expected:
        torch.testing.assert_close(mixed[t], expected[t], rtol=1e-4, atol=1e-5)


def test_mixed_batch_training_gives_each_task_its_own_gradients_and_bn_statistics():
    torch.manual_seed(0)
    x = torch.randn(len(TASKS), 3, 16, 16)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(three_task_model(randomize_norms(SmallCNN()), 16).train())
    mixed = models[0].forward_mixed(x, TASKS)
    sum(out.square().sum() for out in mixed.values()).backward()
    separate = reference(models[1], x, TASKS)
    sum(out.square().sum() for out in separate.values()).backward()
    for (n0, p0), (n1, p1) in zip(models[0].named_parameters(), models[1].named_parameters()):
        assert n0 == n1
        if p0.grad is None:
            assert p1.grad is None, n0
        else:
            torch.testing.assert_close(p0.grad, p1.grad, rtol=1e-4, atol=1e-6, msg=n0)
    for t in "abc":
        bn0 = models[0].task_norm_layers()["bn1"].tasks[t]
        bn1 = models[1].task_norm_layers()["bn1"].tasks[t]
        torch.testing.assert_close(bn0.running_mean, bn1.running_mean)  # only its own samples


def test_mixed_batch_errors():
    model = three_task_model(randomize_norms(SmallCNN()), 16).eval()
    x = torch.randn(3, 3, 16, 16)
    with pytest.raises(ShapeError, match="3 task names|2 task names"):
        model.forward_mixed(x, ["a", "b"])
    with pytest.raises(Exception, match="unknown task 'z'"):
        model.forward_mixed(x, ["a", "b", "z"])
    mha = FTNModel(nn.Sequential(nn.Linear(8, 8)), rank=1)
    attn = FTNModel(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), rank=1)
    attn.add_task("a")
    with pytest.raises(ConfigError, match="forward_mixed does not support"):
        attn.forward_mixed(torch.randn(2, 3, 8), ["a", "a"])
    assert mha.adapted_layers()
