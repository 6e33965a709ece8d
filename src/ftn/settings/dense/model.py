"""Dense multi-task models on a two-scale encoder: FTN, single-task networks and a shared-encoder
multi-task network, all with one DeepLabv3+ decoder per task.

- :class:`DenseEncoder` wraps a :class:`~ftn.settings.dense.deeplab.MultiScaleEncoder` so that its output
  carries the input size: ``forward(x) = (low, high, (H, W))``. :class:`~ftn.core.model.FTNModel`
  applies ``heads[task]`` to the backbone's output only, so this is how a head learns the size to
  upsample to (``4 × low`` would be wrong for sizes not divisible by 4, e.g. NYUD's 425×560 crops).
- :class:`DenseHead` is a :class:`~ftn.settings.dense.deeplab.DeepLabV3PlusHead` taking that triple and
  returning the task's map at input resolution: semseg logits (C channels), depth (1), unit
  normals (3, L2-normalised in the head) and edge logits (1) — the channels and what the head
  applies come from the task's record (:mod:`ftn.settings.dense.tasks`).
- :class:`DenseHeads` holds the decoders of one training task (one dense task, or all of them
  for the shared-encoder multi-task model) and returns ``{task: map}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ...core.errors import ConfigError
from .deeplab import DeepLabV3PlusHead, MultiScaleEncoder, aspp_rates
from .tasks import DENSE_TASKS

__all__ = [
    "DenseEncoder",
    "DenseHead",
    "DenseHeads",
    "SingleDenseHead",
    "build_encoder",
    "build_head",
    "task_channels",
]


def task_channels(task: str, num_classes: int) -> int:
    """Output channels of a task's head: classes for semseg, 1 for depth and edge, 3 for normals."""
    if task not in DENSE_TASKS:
        raise ConfigError(f"unknown dense task {task!r}; known: {list(DENSE_TASKS)}")
    return DENSE_TASKS[task].channels(num_classes)


class DenseEncoder(nn.Module):
    """``MultiScaleEncoder`` whose output also carries the input size: ``(low, high, (H, W))``."""

    def __init__(self, encoder: MultiScaleEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.low_channels = encoder.low_channels
        self.high_channels = encoder.high_channels
        self.output_stride = encoder.output_stride
        self.backbone_name = encoder.backbone_name

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
        low, high = self.encoder(x)
        return low, high, (int(x.shape[-2]), int(x.shape[-1]))


class DenseHead(nn.Module):
    """One task's DeepLabv3+ decoder on ``(low, high, size)``; output at ``size``, passed through
    the task's ``activation`` when its record has one (normals: L2-normalises the 3-vector of
    every pixel); other tasks return raw values (semseg and edge logits, depth in metres).
    """

    def __init__(self, task: str, head: DeepLabV3PlusHead) -> None:
        super().__init__()
        self.task = task
        self.head = head
        spec = DENSE_TASKS.get(task)
        self.activation = spec.activation if spec is not None else None

    def forward(self, features: Sequence[Any]) -> Tensor:
        low, high, size = features
        out = self.head((low, high), size)
        if self.activation is not None:
            out = self.activation(out)
        return out


def build_encoder(backbone: str = "mobilenet_v2", pretrained: bool = True, output_stride: int = 16,
                  weights_path: str | None = None) -> DenseEncoder:
    """A two-scale encoder from a torchvision ResNet-18/34/50 or MobileNetV2.

    ``pretrained=True`` loads ImageNet weights without a network for MobileNetV2 (the offline
    package, see :func:`ftn.training.backbones.offline_mobilenet_v2_weights`); ResNets use torchvision's
    cache or download (an error explains how to proceed offline). ``weights_path`` loads a local
    state dict of the full torchvision classifier instead.
    """
    import torchvision

    from ...training.backbones import pretrained_state_dict

    try:
        model = torchvision.models.get_model(backbone, weights=None)
    except ValueError as exc:
        raise ConfigError(f"unknown backbone {backbone!r}: {exc}") from None
    if weights_path is not None:
        model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    elif pretrained:
        model.load_state_dict(pretrained_state_dict(backbone))
    return DenseEncoder(MultiScaleEncoder(backbone, model, output_stride=output_stride))


def build_head(encoder: DenseEncoder, task: str, num_classes: int, aspp_channels: int = 256,
               low_channels: int = 48, decoder_channels: int = 256) -> DenseHead:
    """A task's decoder for ``encoder`` (ASPP rates from its output stride)."""
    head = DeepLabV3PlusHead(encoder.high_channels, encoder.low_channels, task_channels(task, num_classes),
                             aspp_rates(encoder.output_stride), aspp_channels=aspp_channels,
                             low_channels=low_channels, decoder_channels=decoder_channels)
    return DenseHead(task, head)


class DenseHeads(nn.ModuleDict):
    """The head of one training task: one decoder per dense task it predicts, all on the same
    encoder output; ``forward(features) = {task: map}`` (one entry for a per-task model, every
    task for the joint multi-task model)."""

    def __init__(self, heads: Mapping[str, DenseHead]) -> None:
        super().__init__(dict(heads))

    def forward(self, features: Sequence[Any]) -> dict[str, Tensor]:  # type: ignore[override]
        return {t: head(features) for t, head in self.items()}


class SingleDenseHead(DenseHeads):
    """The :class:`DenseHeads` of one dense task returning its map itself (not ``{task: map}``):
    same state keys as the training head, so ``ftn predict`` / ``ftn serve`` load a per-task
    adapter of the dense setting and get a tensor out."""

    def forward(self, features: Sequence[Any]) -> Tensor:  # type: ignore[override]
        (head,) = self.values()
        return head(features)
