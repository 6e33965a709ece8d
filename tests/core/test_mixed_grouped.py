"""The grouped mixed-task path (ftn.core.mixed): a batch of T tasks runs each layer once, each row
with its own task's correction / weight and norm, and equals running each task on its own."""

import pytest
import torch
import torchvision
from torch import nn

from ftn import FTNModel
from ftn.core import mixed
from ftn.core.layers import MixedTasks
from ftn.core.opcount import count_ops
from ftn.training.backbones import strip_classifier

from helpers import randomize_norms


def perturb(model, name, seed, scale=0.05):
    """Non-zero ΔW (the zero-initialised factor too) and norms for task ``name``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_task_parameters(name):
            p.add_(torch.randn(p.shape, generator=g) * scale)
        for norm in model.task_norm_layers().values():
            bn = norm.tasks[name]
            if getattr(bn, "running_mean", None) is not None:
                bn.running_mean.add_(torch.randn(bn.running_mean.shape, generator=g) * scale)
                bn.running_var.mul_(1 + torch.rand(bn.running_var.shape, generator=g) * scale)


def per_task(model, x, tasks):
    """``model(x[its rows], task=t)`` for each task t of the batch."""
    return model.forward_tasks({t: x[[i for i, n in enumerate(tasks) if n == t]] for t in dict.fromkeys(tasks)})


def assert_mixed_equals_per_task(model, x, tasks, atol=1e-5):
    with torch.no_grad():
        got = model.forward_mixed(x, tasks)
        expected = per_task(model, x, tasks)
    assert list(got) == list(expected)
    for t in expected:
        torch.testing.assert_close(got[t], expected[t], rtol=1e-4, atol=atol, msg=t)


@pytest.fixture
def no_slices(monkeypatch):
    """Fail if any layer or norm falls back to running each task on its own slice."""
    def refuse(self, x, fn):
        raise AssertionError("a layer fell back to the per-task slices")
    monkeypatch.setattr(MixedTasks, "apply", refuse)


@pytest.fixture(params=["lowrank", "full", "auto"])
def strategy(request, monkeypatch):
    """Force every groups=1 conv / Linear onto the low-rank correction or the per-row W + ΔW."""
    factor = {"lowrank": 10**12, "full": 0, "auto": mixed.FULL_WEIGHT_FACTOR}[request.param]
    monkeypatch.setattr(mixed, "FULL_WEIGHT_FACTOR", factor)
    return request.param


def tasks_of_mixed_ranks(model, dim):
    """Tasks with ranks 2 and 5, one with some layers at rank 0 and one allocated from a budget."""
    model.add_task("r2", head=nn.Linear(dim, 3), rank=2)
    model.add_task("r5", head=nn.Linear(dim, 4), rank=5)
    first = next(iter(model.adapted_layers()))
    model.add_task("some0", head=nn.Linear(dim, 2), rank=3, rank_pattern={first: 0, "*.0": 0})
    model.add_task("budget", head=nn.Linear(dim, 5), budget=0.03)
    for i, t in enumerate(model.tasks):
        perturb(model, t, seed=i)
    return model.tasks


def small_torchvision(arch):
    """ResNet-18's blocks (one per stage) and MobileNetV2 at width 0.35: their layer shapes at a
    CPU test's cost."""
    if arch == "resnet":
        net = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    else:
        net = torchvision.models.mobilenet_v2(weights=None, width_mult=0.35)
    return strip_classifier(net)


@pytest.mark.parametrize("arch", ["resnet", "mobilenet_v2"])
def test_torchvision_backbones_equal_per_task(arch, no_slices):
    torch.manual_seed(0)
    backbone, dim = small_torchvision(arch)
    model = FTNModel(randomize_norms(backbone), rank=4).eval()
    names = tasks_of_mixed_ranks(model, dim)
    assert any(model.adapted_layers()[k].rank("some0") == 0 for k in model.adapted_layers())
    tasks = [names[i % len(names)] for i in range(10)]
    assert_mixed_equals_per_task(model, torch.randn(10, 3, 32, 32), tasks)


class ConvZoo(nn.Module):
    """Strided, padded, dilated, depthwise, grouped, 1×1 strided, "same" and biased convs, with
    BatchNorm and GroupNorm."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8), nn.BatchNorm2d(8), nn.ReLU(),  # depthwise
            nn.Conv2d(8, 16, 1, stride=2), nn.GroupNorm(4, 16),  # 1×1 strided
            nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False), nn.ReLU(),  # grouped
            nn.Conv2d(16, 12, (5, 3), stride=(2, 1), padding=(2, 3), dilation=(1, 2)), nn.ReLU(),
            nn.Conv2d(12, 12, 3, padding="same", bias=False), nn.BatchNorm2d(12),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 6))

    def forward(self, x):
        return self.layers(x)


def test_conv_kinds_equal_per_task(strategy, no_slices):
    torch.manual_seed(0)
    model = FTNModel(randomize_norms(ConvZoo()), rank=3).eval()
    names = tasks_of_mixed_ranks(model, 6)
    tasks = ["r5", "budget", "r2", "r5", "some0", "r2", "r5"]
    assert_mixed_equals_per_task(model, torch.randn(len(tasks), 3, 21, 19), tasks)
    assert set(tasks) == set(names)


class TokenNet(nn.Module):
    """Transformer-ish: Linear layers on (N, L, D) tokens with LayerNorm, and an RMSNorm."""

    def __init__(self, d=16):
        super().__init__()
        self.inp = nn.Linear(d, 2 * d)
        self.ln = nn.LayerNorm(2 * d)
        self.mlp = nn.Sequential(nn.Linear(2 * d, 4 * d), nn.GELU(), nn.Linear(4 * d, 2 * d, bias=False))
        self.rms = nn.RMSNorm(2 * d)
        self.out = nn.Linear(2 * d, 8)

    def forward(self, x):
        h = self.ln(self.inp(x))
        h = h + self.mlp(h)
        return self.out(self.rms(h)).mean(1)


def test_linear_and_token_norms_equal_per_task(strategy, no_slices):
    torch.manual_seed(0)
    model = FTNModel(randomize_norms(TokenNet()), rank=4).eval()
    with torch.no_grad():
        for norm in model.task_norm_layers().values():
            norm.base.weight.mul_(1.5)
    names = tasks_of_mixed_ranks(model, 8)
    tasks = [names[i % len(names)] for i in range(9)]
    assert_mixed_equals_per_task(model, torch.randn(9, 7, 16), tasks)


def test_dense_and_gated_updates_use_the_per_row_weight(no_slices):
    torch.manual_seed(0)
    model = FTNModel(randomize_norms(ConvZoo()), rank=3).eval()
    model.add_task("cp", head=nn.Linear(6, 2))
    model.add_task("dense", head=nn.Linear(6, 2), unfreeze=["layers.0", "layers.12"])
    model.add_task("taps", head=nn.Linear(6, 2), gate={"tau": 0.1})
    for i, t in enumerate(model.tasks):
        perturb(model, t, seed=i)
    assert_mixed_equals_per_task(model, torch.randn(6, 3, 16, 16), ["dense", "cp", "taps", "cp", "dense", "taps"])


def test_never_stale_after_factor_norm_and_task_changes():
    torch.manual_seed(0)
    model = FTNModel(randomize_norms(ConvZoo()), rank=3).eval()
    for t in "abc":
        model.add_task(t, head=nn.Linear(6, 3))
        perturb(model, t, seed=ord(t))
    x = torch.randn(6, 3, 16, 16)
    tasks = ["a", "b", "c", "a", "b", "c"]
    assert_mixed_equals_per_task(model, x, tasks)  # builds the stacks
    before = model.forward_mixed(x, tasks)["b"].detach().clone()
    layers = list(model.adapted_layers().values())
    with torch.no_grad():
        layers[0].tasks["b"].factors[0].data.add_(0.3)  # in place, behind the version counter
        layers[3].tasks["b"].factors[1].mul_(-1)  # the 1×1 conv
    assert not torch.allclose(model.forward_mixed(x, tasks)["b"], before)
    assert_mixed_equals_per_task(model, x, tasks)
    with torch.no_grad():
        model.task_norm_layers()["layers.1"].tasks["c"].running_mean.add_(0.5)  # a norm statistic
        model.task_norm_layers()["layers.7"].tasks["a"].weight.mul_(2)  # a GroupNorm affine
    assert_mixed_equals_per_task(model, x, tasks)
    layers[4].tasks["a"].factors[2] = nn.Parameter(torch.randn_like(layers[4].tasks["a"].factors[2]))  # replaced
    assert_mixed_equals_per_task(model, x, tasks)
    # an optimizer step (the eval caches' generation) over a task absent from the last batches
    opt = torch.optim.SGD(model.task_parameters("c"), lr=0.1)
    model.train()
    sum(o.sum() for o in model.forward_mixed(x[:2], ["c", "c"]).values()).backward()
    opt.step()
    model.eval()
    assert_mixed_equals_per_task(model, x, tasks)
    # remove a task, then add another under the same name with another rank
    model.remove_task("b")
    with pytest.raises(Exception, match="unknown task 'b'"):
        model.forward_mixed(x, tasks)
    assert_mixed_equals_per_task(model, x, ["a", "c", "c", "a"][:4] + ["a", "c"])
    model.add_task("b", head=nn.Linear(6, 3), rank=5)
    perturb(model, "b", seed=99)
    assert_mixed_equals_per_task(model, x, tasks)
    model.add_task("d", head=nn.Linear(6, 3), rank=1)
    perturb(model, "d", seed=98)
    assert_mixed_equals_per_task(model, x, ["d", "a", "b", "d", "c", "a"])


def test_training_and_autograd_keep_the_per_task_path(monkeypatch):
    torch.manual_seed(0)
    model = FTNModel(randomize_norms(ConvZoo()), rank=3)
    for t in "ab":
        model.add_task(t)
    called = []
    monkeypatch.setattr(mixed, "mixed_layer_forward", lambda *a: called.append(1))
    model.train()
    model.forward_mixed(torch.randn(4, 3, 16, 16), ["a", "b", "a", "b"])
    model.eval()
    model.forward_mixed(torch.randn(4, 3, 16, 16), ["a", "b", "a", "b"])  # autograd on
    with torch.no_grad():
        model.forward_mixed(torch.randn(4, 3, 16, 16), ["a", "b", "a", "b"], grouped=False)
    assert called == []


def mobilenet_like(num_tasks):
    torch.manual_seed(0)
    backbone, _ = small_torchvision("mobilenet_v2")
    model = FTNModel(backbone, rank=4).eval()
    names = [f"t{i}" for i in range(num_tasks)]
    for i, name in enumerate(names):
        model.add_task(name, rank=2 + i % 3)  # Identity heads: the backbone's ops only
    return model, names


def test_dispatched_ops_do_not_grow_with_the_number_of_tasks():
    x = torch.randn(16, 3, 32, 32)
    counts = {}
    for num_tasks in (2, 8):
        model, names = mobilenet_like(num_tasks)
        tasks = [names[i % num_tasks] for i in range(16)]
        with torch.no_grad():
            model.forward_mixed(x, tasks)  # builds the stacks
            _, counted = count_ops(lambda: model.forward_mixed(x, tasks))
        counts[num_tasks] = counted.ops
        assert counted.host_syncs == 0
    with torch.no_grad():
        _, sliced = count_ops(lambda: model.forward_mixed(x, tasks, grouped=False))
    assert counts[8] == counts[2], counts
    assert sliced.ops > 3 * counts[8]  # the per-task slices: every layer once per task


def test_loading_or_removing_a_task_builds_only_its_own_slots():
    """A resident-set change (serving's load / evict) rebuilds the changed task's slots only, in
    every module, not every resident task's; a changed input still rebuilds that slot."""
    model, names = mobilenet_like(6)
    for i, name in enumerate(names):
        perturb(model, name, seed=i)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        model.forward_mixed(x, [names[i % 4] for i in range(8)])  # t0..t3 built
        mixed.slot_builds.clear()
        model.forward_mixed(x, [names[i % 4] for i in range(8)])
        assert sum(mixed.slot_builds.values()) == 0  # warm: nothing rebuilt
        model.remove_task(names[1])
        model.add_task("new", rank=3)
        perturb(model, "new", seed=50)
        tasks = ["new", names[0], names[2], names[3], names[4], "new", names[0], names[3]]
        model.forward_mixed(x, tasks)
    built = dict(mixed.slot_builds)
    assert set(built) == {"new", names[4]}, built  # t4 never ran before; t0, t2, t3 kept theirs
    assert built["new"] >= len(model.adapted_layers())
    assert_mixed_equals_per_task(model, x, tasks)
    layer = next(iter(model.adapted_layers().values()))
    with torch.no_grad():
        layer.tasks[names[0]].factors[0].mul_(2)  # one input of one slot changed
        mixed.slot_builds.clear()
        model.forward_mixed(x, tasks)
    assert dict(mixed.slot_builds) == {names[0]: 1}
    assert_mixed_equals_per_task(model, x, tasks)


def test_a_model_with_stacks_saves_and_copies():
    """The stacks (and the watches' weak references) are a cache: a saved or copied model starts
    without them and still equals the per-task model."""
    import copy
    import io

    model, names = mobilenet_like(3)
    x = torch.randn(6, 3, 32, 32)
    tasks = [names[i % 3] for i in range(6)]
    with torch.no_grad():
        model.forward_mixed(x, tasks)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        assert all(not s.slots for m in other.modules() for s in m.__dict__.get("_mixed_stacks", {}).values())
        assert_mixed_equals_per_task(other.eval(), x, tasks)
