"""DeepLabv3+ decoder head and a two-scale encoder wrapper for torchvision backbones.

The RCM / Multi-Task-Learning-PyTorch NYUD setup is a ResNet-18 encoder at output stride 16
with one DeepLabv3+ head per task. Here:

- :class:`MultiScaleEncoder` turns a torchvision ResNet or MobileNetV2 into a module whose
  ``forward(x)`` returns ``(low, high)``: low-level features at stride 4 and high-level features
  at the requested output stride (8, 16 or 32), obtained by replacing strides with dilation.
- :class:`DeepLabV3PlusHead` is ASPP (torchvision's) on the high-level features, a low-level skip
  (1×1 to 48 channels, concatenation, two 3×3 convs) and a 1×1 classifier, upsampled to the
  requested output size.

Dilation is applied by editing the convolutions of an already-built model rather than through
torchvision's ``replace_stride_with_dilation``: that flag raises ``NotImplementedError`` for the
``BasicBlock`` of ResNet-18/34 and does not exist for MobileNetV2, and editing also works on a
model the caller has already loaded weights into (no download ever happens here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.segmentation.deeplabv3 import ASPP

from ...core.errors import ConfigError, ShapeError

__all__ = ["aspp_rates", "DeepLabV3PlusHead", "MultiScaleEncoder", "SUPPORTED_BACKBONES"]

SUPPORTED_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "mobilenet_v2")


def aspp_rates(output_stride: int) -> tuple[int, int, int]:
    """ASPP atrous rates for an output stride: (6, 12, 18) at 16, doubled at 8, halved at 32,
    so the branches always cover the same fraction of the image."""
    rates = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}
    if output_stride not in rates:
        raise ConfigError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    return rates[output_stride]


def _conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DeepLabV3PlusHead(nn.Module):
    """DeepLabv3+ decoder: ASPP(high) ↑ to the low-level size ⊕ reduce(low) → 2×(3×3 conv) → 1×1.

    Args:
        in_channels_high: channels of the high-level (stride 8/16/32) features.
        in_channels_low: channels of the low-level (stride 4) features.
        out_channels: predicted channels (classes for semseg, 1 for depth/edge, 3 for normals).
        aspp_rates: atrous rates; use :func:`aspp_rates` (6, 12, 18 at output stride 16, 12, 24,
            36 at 8).
        aspp_channels: width of ASPP's branches and output (256 in DeepLabv3+).
        low_channels: width the low-level features are reduced to (48 in DeepLabv3+, small so the
            high-level semantics dominate the concatenation).
        decoder_channels: width of the two 3×3 convs.

    ``forward(features, output_size)``: ``features`` is ``(low, high)`` or a mapping with keys
    ``"low"`` and ``"high"``; the logits are bilinearly upsampled to ``output_size`` = (H, W) (the
    input image size), or returned at the low-level resolution when it is ``None``.

    ASPP's image-pooling branch (torchvision's) applies BatchNorm to a 1×1 map, so in training
    mode the batch must hold more than one image, as for any DeepLabv3.
    """

    def __init__(
        self,
        in_channels_high: int,
        in_channels_low: int,
        out_channels: int,
        aspp_rates: Sequence[int] = (6, 12, 18),
        aspp_channels: int = 256,
        low_channels: int = 48,
        decoder_channels: int = 256,
    ) -> None:
        super().__init__()
        if min(in_channels_high, in_channels_low, out_channels) < 1:
            raise ConfigError("channel counts must be >= 1")
        self.aspp = ASPP(in_channels_high, list(aspp_rates), aspp_channels)
        self.reduce = _conv_bn_relu(in_channels_low, low_channels, 1)
        self.fuse = nn.Sequential(
            _conv_bn_relu(aspp_channels + low_channels, decoder_channels, 3),
            _conv_bn_relu(decoder_channels, decoder_channels, 3),
        )
        self.classifier = nn.Conv2d(decoder_channels, out_channels, 1)
        self.in_channels_high = in_channels_high
        self.in_channels_low = in_channels_low
        self.out_channels = out_channels

    def forward(
        self, features: tuple[Tensor, Tensor] | Sequence[Tensor] | Mapping[str, Tensor], output_size: Sequence[int] | None = None
    ) -> Tensor:
        if isinstance(features, Mapping):
            low, high = features["low"], features["high"]
        else:
            low, high = features
        if low.shape[1] != self.in_channels_low or high.shape[1] != self.in_channels_high:
            raise ShapeError(
                f"head expects (low, high) with {self.in_channels_low} and {self.in_channels_high} channels, "
                f"got {low.shape[1]} and {high.shape[1]}"
            )
        x = self.aspp(high)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        x = self.fuse(torch.cat([x, self.reduce(low)], dim=1))
        x = self.classifier(x)
        if output_size is not None:
            x = F.interpolate(x, size=tuple(output_size), mode="bilinear", align_corners=False)
        return x


# --------------------------------------------------------------------------------------------
# Encoder


def _set_dilation(conv: nn.Conv2d, dilation: int) -> None:
    # Keeps the output size of a "same"-padded conv: padding = dilation · (k − 1) / 2.
    kh, kw = conv.kernel_size
    conv.dilation = (dilation, dilation)
    conv.padding = (dilation * (kh - 1) // 2, dilation * (kw - 1) // 2)


def _dilate(blocks: Sequence[nn.Module], start_stride: int, output_stride: int) -> None:
    """Replace strides by dilation in ``blocks`` (in forward order) once ``output_stride`` is
    reached.

    A block containing a stride-2 conv (the main path and, in a ResNet, its 1×1 shortcut) is one
    downsampling step. When it must go: its strides become 1, its strided k×k conv keeps the
    dilation so far, and every later k×k conv — the rest of this block (e.g. BasicBlock's conv2)
    and all following blocks — gets twice that. This preserves each conv's receptive field, as in
    the DeepLab / CSAIL ``_nostride_dilate`` recipe.
    """
    stride, dil = start_stride, 1
    for block in blocks:
        convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
        if any(c.stride != (1, 1) for c in convs) and stride >= output_stride:
            new, after_stride = dil * 2, False
            for c in convs:
                k_gt1 = max(c.kernel_size) > 1
                if c.stride != (1, 1):
                    c.stride = (1, 1)
                    if k_gt1:
                        _set_dilation(c, dil)
                        after_stride = True
                elif k_gt1:
                    _set_dilation(c, new if after_stride else dil)
            dil = new
        else:
            if any(c.stride != (1, 1) for c in convs):
                stride *= 2
            if dil > 1:
                for c in convs:
                    if max(c.kernel_size) > 1:
                        _set_dilation(c, dil)


class MultiScaleEncoder(nn.Module):
    """Torchvision backbone → ``forward(x) = (low, high)``.

    ``low`` is at stride 4 (ResNet ``layer1``: 64 channels for ResNet-18/34, 256 for 50+;
    MobileNetV2 ``features[:4]``: 24 channels); ``high`` at ``output_stride`` (ResNet ``layer4``:
    512 / 2048 channels; MobileNetV2 ``features[4:18]``: 320 channels — the final 1×1 conv to 1280
    channels is dropped, as in DeepLab's MobileNetV2).

    Args:
        backbone_name: one of ``SUPPORTED_BACKBONES``.
        model: an already-built torchvision model of that architecture (e.g. with pretrained
            weights loaded); its modules are reused, not copied, and its strides are edited in
            place. Build it *without* ``replace_stride_with_dilation``. ``None`` builds one
            with ``torchvision.models.get_model(backbone_name, weights=weights)``.
        output_stride: 8, 16 (default, the RCM setting) or 32.
        weights: only used when ``model`` is None; ``None`` = random initialisation (no download).

    ``low_channels``, ``high_channels`` and the achieved strides are measured once with a small
    dummy forward (in eval mode, so BatchNorm statistics are untouched).
    """

    def __init__(
        self,
        backbone_name: str,
        model: nn.Module | None = None,
        output_stride: int = 16,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        if backbone_name not in SUPPORTED_BACKBONES:
            raise ConfigError(f"unsupported backbone {backbone_name!r}; supported: {list(SUPPORTED_BACKBONES)}")
        if output_stride not in (8, 16, 32):
            raise ConfigError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        if model is None:
            import torchvision

            model = torchvision.models.get_model(backbone_name, weights=weights)
        self.backbone_name = backbone_name
        self.output_stride = output_stride
        if backbone_name.startswith("resnet"):
            needed = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
            if not all(hasattr(model, a) for a in needed):
                raise ConfigError(f"model is not a torchvision ResNet (needs {needed})")
            _dilate([*model.layer2, *model.layer3, *model.layer4], 4, output_stride)
            self.low = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1)
            self.high = nn.Sequential(model.layer2, model.layer3, model.layer4)
        else:
            feats = getattr(model, "features", None)
            if not isinstance(feats, nn.Sequential) or len(feats) != 19:
                raise ConfigError("model is not a torchvision MobileNetV2 (needs a 19-module .features)")
            _dilate(list(feats[4:18]), 4, output_stride)
            self.low = feats[:4]
            self.high = feats[4:18]
        self.low_channels, self.high_channels = self._probe()

    @torch.no_grad()
    def _probe(self) -> tuple[int, int]:
        was_training = self.training
        self.eval()
        try:
            param = next(self.parameters())
            x = torch.zeros(1, 3, 64, 64, device=param.device, dtype=param.dtype)
            low, high = self(x)
        finally:
            self.train(was_training)
        if low.shape[-1] != 64 // 4 or high.shape[-1] != 64 // self.output_stride:
            raise ConfigError(
                f"{self.backbone_name}: measured strides {64 // low.shape[-1]} / {64 // high.shape[-1]}, "
                f"expected 4 / {self.output_stride} (was the model built with replace_stride_with_dilation?)"
            )
        return int(low.shape[1]), int(high.shape[1])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        low = self.low(x)
        return low, self.high(low)
