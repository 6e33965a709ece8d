"""DeepLabv3+ head and the two-scale encoder wrapper (random weights, CPU, no download)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from ftn.settings.dense.deeplab import DeepLabV3PlusHead, MultiScaleEncoder, aspp_rates
from ftn.settings.dense.model import DenseEncoder, DenseHeads, build_head
from ftn.core.errors import ConfigError, ShapeError


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.mark.parametrize("output_stride", [16, 8])
def test_resnet18_encoder_and_head_shapes(output_stride: int) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    enc = MultiScaleEncoder("resnet18", model, output_stride=output_stride)
    assert enc.low[0] is model.conv1  # the given model's modules are reused, not copied
    assert (enc.low_channels, enc.high_channels) == (64, 512)
    head = DeepLabV3PlusHead(512, 64, 5, aspp_rates(output_stride))
    x = torch.randn(2, 3, 96, 80)
    low, high = enc(x)
    assert low.shape == (2, 64, 24, 20)
    assert high.shape == (2, 512, 96 // output_stride, 80 // output_stride)
    out = head((low, high), x.shape[-2:])
    assert out.shape == (2, 5, 96, 80)
    # Training mode (batch > 1) backpropagates into the encoder.
    out.mean().backward()
    assert model.conv1.weight.grad is not None
    # Dilation keeps receptive fields: the strided 3×3 keeps the old rate, later 3×3s double it.
    first = model.layer4[0]
    old, new = (1, 2) if output_stride == 16 else (2, 4)
    assert first.conv1.stride == (1, 1) and first.conv1.dilation == (old, old)
    assert first.conv2.dilation == (new, new) and model.layer4[1].conv1.dilation == (new, new)
    assert first.downsample[0].stride == (1, 1)
    assert model.layer3[0].conv1.stride == ((2, 2) if output_stride == 16 else (1, 1))


def test_mobilenet_v2_encoder_shapes() -> None:
    torch.manual_seed(0)
    enc = MultiScaleEncoder("mobilenet_v2", torchvision.models.mobilenet_v2(weights=None), output_stride=16)
    assert (enc.low_channels, enc.high_channels) == (24, 320)
    encoder = DenseEncoder(enc)
    heads = DenseHeads({t: build_head(encoder, t, 7) for t in ("semseg", "depth", "normals", "edge")}).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        low, high = enc(x)
        out = heads(encoder.eval()(x))
    assert low.shape == (1, 24, 16, 24) and high.shape == (1, 320, 4, 6)
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == {
        "semseg": (7, 64, 96), "depth": (1, 64, 96), "normals": (3, 64, 96), "edge": (1, 64, 96)}
    enc32 = MultiScaleEncoder("mobilenet_v2", torchvision.models.mobilenet_v2(weights=None), output_stride=32)
    assert enc32(x)[1].shape[-2:] == (2, 3)


def test_dilation_matches_torchvision_for_bottleneck() -> None:
    # For Bottleneck ResNets torchvision's replace_stride_with_dilation exists: our in-place edit
    # of an undilated model must give the same convolutions and outputs.
    torch.manual_seed(0)
    ref = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True]).eval()
    model = torchvision.models.resnet50(weights=None)
    model.load_state_dict(ref.state_dict())
    enc = MultiScaleEncoder("resnet50", model, output_stride=8).eval()

    def convs(m: nn.Module) -> list[tuple]:
        return [(n, c.stride, c.dilation, c.padding) for n, c in m.named_modules() if isinstance(c, nn.Conv2d)]

    assert convs(model) == convs(ref)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))))
        assert torch.allclose(enc(x)[1], expected)


def test_head_accepts_dict_and_checks_channels() -> None:
    head = DeepLabV3PlusHead(32, 16, 3, aspp_channels=24, decoder_channels=24).eval()
    feats = {"low": torch.randn(1, 16, 12, 12), "high": torch.randn(1, 32, 3, 3)}
    assert head(feats).shape == (1, 3, 12, 12)  # no output size: low-level resolution
    assert head(feats, (48, 48)).shape == (1, 3, 48, 48)
    with pytest.raises(ShapeError):
        head((feats["high"], feats["low"]), (48, 48))


def test_encoder_config_errors() -> None:
    with pytest.raises(ConfigError):
        MultiScaleEncoder("vgg16", nn.Identity())
    with pytest.raises(ConfigError):
        MultiScaleEncoder("resnet18", torchvision.models.resnet18(weights=None), output_stride=4)
    with pytest.raises(ConfigError):
        MultiScaleEncoder("resnet18", nn.Linear(2, 2))
    with pytest.raises(ConfigError):
        aspp_rates(12)
