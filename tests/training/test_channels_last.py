"""``train.channels_last``: image batches follow the backbone into the channels-last layout, so
FTN's convs (whose W + ΔW is built in the default layout) run channels-last like full
fine-tuning's, instead of silently staying in NCHW (they did: the demo's FTN step was 1.75x full
fine-tuning's with the flag on)."""

from __future__ import annotations

import torch
from torch import nn

import ftn
from ftn.training.engine import to_device


def test_to_device_puts_image_batches_in_channels_last_and_leaves_the_rest():
    images, labels, tokens = torch.randn(4, 3, 8, 8), torch.arange(4), torch.randn(4, 5, 6)
    moved = to_device({"x": (images, labels), "t": tokens, "masks": torch.zeros(4, 1, 8, 8, dtype=torch.long)},
                      torch.device("cpu"), channels_last=True)
    assert moved["x"][0].is_contiguous(memory_format=torch.channels_last)
    assert not moved["x"][0].is_contiguous()  # really NHWC, not a layout-agnostic shape
    assert torch.equal(moved["x"][0], images) and torch.equal(moved["x"][1], labels)
    assert moved["t"].is_contiguous() and moved["masks"].is_contiguous()  # not images: unchanged
    plain = to_device(images, torch.device("cpu"))
    assert plain.is_contiguous()


def test_ftn_convs_run_channels_last_when_the_batch_is():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net = net.to(memory_format=torch.channels_last)
    model = ftn.FTNModel(net, rank=2)
    model.add_task("t", head=nn.Linear(16, 3))
    with torch.no_grad():
        for p in model.task_parameters("t"):
            p.add_(0.01 * torch.randn_like(p))  # a non-zero ΔW
    layouts = []
    for conv in (m for m in net.modules() if isinstance(m, ftn.core.layers.FTNLayer)):
        conv.register_forward_hook(lambda _m, _i, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last)))
    x = to_device(torch.randn(2, 3, 8, 8), torch.device("cpu"), channels_last=True)
    for fast in (None, False):  # the CPU's default backward choice, and plain autograd
        for conv in (m for m in net.modules() if isinstance(m, ftn.core.layers.FTNLayer)):
            conv.fast_backward = fast
        layouts.clear()
        model.train()
        out = model(x, task="t")
        out.sum().backward()
        assert layouts and all(layouts), layouts
    reference = model(x.contiguous(), task="t")  # same values in either layout
    assert torch.allclose(out, reference, atol=1e-5)
