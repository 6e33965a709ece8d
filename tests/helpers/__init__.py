"""What several test modules share: small networks that exercise every layer kind the core
supports, and helpers to make and compare models. Fixtures live in ``conftest.py``; plain
functions and classes live here, imported as ``from helpers import ...``."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ftn import FTNModel

#: The repository's root (README, configs/, src/).
REPO = Path(__file__).resolve().parents[2]


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


def fresh_model(seed: int = 0, **options) -> FTNModel:
    """A rank-3 FTNModel over a seeded SmallCNN with non-trivial norms, in eval mode."""
    torch.manual_seed(seed)
    return FTNModel(randomize_norms(SmallCNN()).eval(), rank=3, **options).eval()


def needs_minilm() -> None:
    """Skip unless transformers and the offline all-MiniLM-L6-v2 package are installed."""
    pytest.importorskip("transformers")
    from ftn.settings.text.backbone import minilm_path

    try:
        minilm_path()
    except Exception as exc:  # the pretrained model is an optional, separately installed package
        pytest.skip(str(exc))


def tiny_dense_config(scenes: Path, out: Path, *extra: str):
    """A small dense run: MobileNetV2 (random weights), narrow decoders, 2 steps per task, CPU."""
    from ftn.training.config import apply_overrides, new_config

    return apply_overrides(new_config("dense"), [
        f"data.root={scenes}", "data.crop=[32,48]", "data.batch_size=2", "data.eval_batch_size=2",
        "model.backbone=mobilenet_v2", "model.pretrained=false", "model.aspp_channels=16",
        "model.low_channels=8", "model.decoder_channels=16", "method.ftn.rank=4", "train.max_steps=2",
        "train.device=cpu", "train.recalibrate_batches=2", f"output_dir={out}", "train.resume=false", *extra])


def train_steps(model, task, images, steps=3, lr=0.05):
    """A few SGD steps of ``task`` towards a random target, then eval mode: a trained-looking task."""
    model.train()
    opt = torch.optim.SGD(model.task_parameters(task), lr=lr)
    target = torch.randn_like(model(images, task=task))
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(images, task=task) - target).pow(2).mean()
        loss.backward()
        opt.step()
    model.eval()
