"""FTNModel.recompute_depthwise (ftn.core.recompute): the same gradients and statistics, less memory."""

import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ftn import FTNModel
from ftn.core.recompute import OutputRecompute, _Recipe

from helpers import SmallCNN


def _mobilenet(seed: int = 0) -> FTNModel:
    torch.manual_seed(seed)
    backbone = torchvision.models.mobilenet_v2(weights=None, width_mult=0.5)
    backbone.classifier = nn.Identity()
    model = FTNModel(backbone, rank=4)
    model.add_task("t", head=nn.Linear(1280, 5))
    with torch.no_grad():  # a trained-looking ΔW, so the recomputed outputs depend on it
        for p in model.task_parameters("t"):
            p.add_(torch.randn_like(p) * 0.02)
    model.set_task("t")
    return model.train()


def _step(model, x, y):
    model.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach()


def _live_tensor_peak(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def test_recompute_gives_identical_gradients_and_statistics_and_saves_memory(one_thread):
    plain, lean = _mobilenet(), _mobilenet()
    assert lean.recompute_depthwise() == 17  # MobileNetV2's depthwise convs
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 64, 64, generator=g), torch.randint(0, 5, (8,), generator=g)
    calls = []
    mark = lean.context.recompute.mark
    lean.context.recompute.mark = lambda out, fn: mark(out, lambda: calls.append(1) or fn())
    peaks = {}
    for name, model in (("plain", plain), ("lean", lean)):
        peaks[name] = _live_tensor_peak(lambda: _step(model, x, y))
    assert len(calls) == 17  # every depthwise output was rebuilt once, in the backward
    for p, q in zip(plain.task_parameters("t"), lean.task_parameters("t")):
        assert torch.equal(p.grad, q.grad)  # bit for bit: the same conv on the same inputs
    for (name, a), (_, b) in zip(plain.named_buffers(), lean.named_buffers()):
        assert torch.equal(a, b), name  # BatchNorm statistics moved once, identically
    # The depthwise outputs (the BatchNorm inputs that are no longer kept) at batch 8, 64 px.
    maps = _depthwise_maps(plain, 64)
    assert len(maps) == 17
    dw_bytes = sum(8 * m.out_channels * s * s * 4 for m, s in maps)
    assert peaks["plain"] - peaks["lean"] > 0.8 * dw_bytes, (peaks, dw_bytes)


def _depthwise_maps(model, size):
    maps = []
    hooks = [layer.register_forward_hook(lambda m, i, o: maps.append((m.base, o.shape[-1])))
             for layer in model.adapted_layers().values()
             if layer.base.groups > 1 and layer.base.groups == layer.base.in_channels]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    model.train()
    for h in hooks:
        h.remove()
    return maps


def test_an_output_changed_in_place_is_saved_as_is(images):
    # depthwise conv → in-place ReLU: the ReLU saves its (modified) result, which the recipe
    # could not rebuild; it must be kept, and the gradients stay exact.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1, groups=3)
            self.relu = nn.ReLU(inplace=True)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.relu(self.conv(x))).mean((2, 3))

    torch.manual_seed(0)
    _assert_same_gradients(_with_task(Net()), images, expected_layers=1)


def test_recompute_is_off_outside_training_and_can_be_turned_off(images):
    model = FTNModel(SmallCNN(), rank=2)
    model.add_task("t", head=nn.Identity())
    assert model.recompute_depthwise() == 1  # SmallCNN has one depthwise conv
    recompute = model.context.recompute
    seen = []
    recompute.mark = lambda out, fn: seen.append(out)
    model.eval()
    with torch.no_grad():
        model(images, task="t")
    model.train()
    with torch.no_grad():
        model(images, task="t")
    assert seen == [] and not recompute.active
    model(images, task="t").sum().backward()
    assert len(seen) == 1 and not recompute.active and recompute._marked == {}
    assert model.recompute_depthwise(enabled=False) == 0
    assert model.context.recompute is None
    assert not any(layer.recompute_output for layer in model.adapted_layers().values())


def test_marks_do_not_match_a_different_tensor():
    recompute = OutputRecompute()
    a = torch.ones(3)
    recompute.mark(a, lambda: torch.zeros(3))
    assert isinstance(recompute._pack(a), _Recipe)
    b = torch.ones(3)
    assert recompute._pack(b) is b  # not marked: saved as is
    a.add_(1)
    assert recompute._pack(a) is a  # changed in place since it was marked: saved as is


@pytest.mark.parametrize("thin", [True, False])
def test_recompute_with_forced_backward_modes(images, thin):
    # fast_backward=False runs autograd through W + ΔW, not the custom Function: nothing is
    # marked then, and the gradients are those of the plain model all the same.
    model = _with_task(SmallCNN())
    for layer in model.adapted_layers().values():
        layer.fast_backward = thin
    _assert_same_gradients(model, images, expected_layers=1)


def _with_task(backbone: nn.Module) -> FTNModel:
    model = FTNModel(backbone, rank=2)
    model.add_task("t", head=nn.Identity())
    with torch.no_grad():  # a non-zero ΔW
        for p in model.task_parameters("t"):
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _assert_same_gradients(plain: FTNModel, images, expected_layers: int) -> None:
    lean = copy.deepcopy(plain)
    assert lean.recompute_depthwise() == expected_layers
    grads = []
    for model in (plain, lean):
        model.train().zero_grad()
        model(images, task="t").square().mean().backward()
        grads.append([p.grad for p in model.task_parameters("t")])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_recompute_under_bf16_autocast_gives_identical_gradients(images):
    # The recipe rebuilds the output with the forward's autocast dtype, though it runs in the
    # backward, outside autocast.
    torch.manual_seed(0)
    plain = _with_task(SmallCNN())
    lean = copy.deepcopy(plain)
    lean.recompute_depthwise()
    calls = []
    mark = lean.context.recompute.mark
    lean.context.recompute.mark = lambda out, fn: mark(out, lambda: calls.append(out.dtype) or fn())
    grads = []
    for model in (plain, lean):
        model.train().zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images, task="t").float().square().mean()
        out.backward()
        grads.append([p.grad for p in model.task_parameters("t")])
    assert calls == [torch.bfloat16]
    for a, b in zip(*grads):
        assert torch.equal(a, b)
