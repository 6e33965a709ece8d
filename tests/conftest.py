"""Shared fixtures: small, fast networks that exercise every layer kind the core supports."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn


class Conv2dSame(nn.Conv2d):
    """A conv that pads "same" itself before calling the conv (as EfficientNet ports do)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        dh, dw = self.dilation
        ph = max((-(-ih // sh) - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
        pw = max((-(-iw // sw) - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SmallCNN(nn.Module):
    """Stem, same-padding subclass, depthwise, grouped, dilated, reflect-padded and 1×1 convs,
    BatchNorm, GroupNorm, LayerNorm and Linear layers: every case the wrappers must get right."""

    def __init__(self, width: int = 8, out_dim: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.same = Conv2dSame(width, width, 3, stride=2, bias=True)
        self.depthwise = nn.Conv2d(width, width, 3, padding="same", groups=width, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.grouped = nn.Conv2d(width, 2 * width, (3, 1), padding=(1, 0), groups=2, dilation=(2, 1),
                                 padding_mode="reflect")
        self.gn = nn.GroupNorm(2, 2 * width)
        self.pointwise = nn.Conv2d(2 * width, 2 * width, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.ln = nn.LayerNorm(2 * width)
        self.fc = nn.Linear(2 * width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.stem(x)))
        x = F.relu(self.bn2(self.depthwise(self.same(x))))
        x = F.relu(self.gn(self.grouped(x)))
        x = self.pointwise(x)
        x = self.pool(x).flatten(1)
        return self.fc(self.ln(x))


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give norm layers non-trivial affine and statistics so that tests can tell them apart."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def tensor_hash(tensors) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture
def small_cnn() -> SmallCNN:
    torch.manual_seed(0)
    return randomize_norms(SmallCNN()).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests: on a busy 2-core machine OpenMP's
    barrier between two threads costs milliseconds per op (a 1×32×16×24 BatchNorm: 8 ms with 2
    threads, 0.01 ms with 1). The setting is restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_CORE_DIR = __import__("pathlib").Path(__file__).parent / "core"


def pytest_collection_modifyitems(config, items):
    """Mark tests by layer: ``core`` (tests/core: the library, torch + safetensors) and ``harness``
    (everything else: training, data, CLI, serving). ``pytest -m core`` runs the fast core suite."""
    for item in items:
        in_core = _CORE_DIR in item.path.parents
        item.add_marker(pytest.mark.core if in_core else pytest.mark.harness)
