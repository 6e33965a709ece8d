"""Dense multi-task models on a two-scale encoder: FTN, single-task networks and a shared-encoder
multi-task network, all with one DeepLabv3+ decoder per task.

- :class:`DenseEncoder` wraps a :class:`~ftn.dense.deeplab.MultiScaleEncoder` so that its output
  carries the input size: ``forward(x) = (low, high, (H, W))``. :class:`~ftn.model.FTNModel`
  applies ``heads[task]`` to the backbone's output only, so this is how a head learns the size to
  upsample to (``4 × low`` would be wrong for sizes not divisible by 4, e.g. NYUD's 425×560 crops).
- :class:`DenseHead` is a :class:`~ftn.dense.deeplab.DeepLabV3PlusHead` taking that triple and
  returning the task's map at input resolution: semseg logits (C channels), depth (1), unit
  normals (3, L2-normalised in the head) and edge logits (1).
- :func:`build_dense_ftn` wraps the encoder in :class:`~ftn.model.FTNModel` (frozen; every conv
  adapted) and adds one task per dense task: its own ΔW (rank per task), its own copy of every
  encoder norm and its own decoder.
- :class:`SingleTaskNet` (encoder + one decoder, everything trainable) and
  :class:`MultiTaskNet` (one trainable encoder shared by all decoders) are the baselines.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..model import FTNModel
from .deeplab import DeepLabV3PlusHead, MultiScaleEncoder, aspp_rates
from .nyud import TASKS

__all__ = [
    "DenseEncoder",
    "DenseHead",
    "SingleTaskNet",
    "MultiTaskNet",
    "build_encoder",
    "build_head",
    "build_dense_ftn",
    "task_channels",
    "count_parameters",
    "clone_encoder",
]


def task_channels(task: str, num_classes: int) -> int:
    """Output channels of a task's head: classes for semseg, 1 for depth and edge, 3 for normals."""
    channels = {"semseg": num_classes, "depth": 1, "normals": 3, "edge": 1}
    if task not in channels:
        raise ConfigError(f"unknown dense task {task!r}; known: {list(TASKS)}")
    return channels[task]


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
    """One task's DeepLabv3+ decoder on ``(low, high, size)``; output at ``size``.

    ``task="normals"`` L2-normalises the 3-vector of every pixel (the losses and metrics do it
    again, harmlessly); other tasks return raw values (semseg and edge logits, depth in metres).
    """

    def __init__(self, task: str, head: DeepLabV3PlusHead) -> None:
        super().__init__()
        self.task = task
        self.head = head

    def forward(self, features: Sequence[Any]) -> Tensor:
        low, high, size = features
        out = self.head((low, high), size)
        if self.task == "normals":
            out = F.normalize(out, dim=1, eps=1e-12)
        return out


def build_encoder(backbone: str = "mobilenet_v2", pretrained: bool = True, output_stride: int = 16,
                  weights_path: str | None = None) -> DenseEncoder:
    """A two-scale encoder from a torchvision ResNet-18/34/50 or MobileNetV2.

    ``pretrained=True`` loads ImageNet weights without a network for MobileNetV2 (the offline
    package, see :func:`ftn.backbones.offline_mobilenet_v2_weights`); ResNets use torchvision's
    cache or download (an error explains how to proceed offline). ``weights_path`` loads a local
    state dict of the full torchvision classifier instead.
    """
    import torchvision

    from ..backbones import _pretrained_state_dict

    try:
        model = torchvision.models.get_model(backbone, weights=None)
    except ValueError as exc:
        raise ConfigError(f"unknown backbone {backbone!r}: {exc}") from None
    if weights_path is not None:
        model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    elif pretrained:
        model.load_state_dict(_pretrained_state_dict(backbone))
    return DenseEncoder(MultiScaleEncoder(backbone, model, output_stride=output_stride))


def build_head(encoder: DenseEncoder, task: str, num_classes: int, aspp_channels: int = 256,
               low_channels: int = 48, decoder_channels: int = 256) -> DenseHead:
    """A task's decoder for ``encoder`` (ASPP rates from its output stride)."""
    head = DeepLabV3PlusHead(encoder.high_channels, encoder.low_channels, task_channels(task, num_classes),
                             aspp_rates(encoder.output_stride), aspp_channels=aspp_channels,
                             low_channels=low_channels, decoder_channels=decoder_channels)
    return DenseHead(task, head)


def build_dense_ftn(encoder: DenseEncoder, tasks: Sequence[str], num_classes: int,
                    rank: int | Mapping[str, int] = 30, head_kwargs: Mapping[str, Any] | None = None,
                    seed: int | None = None, **ftn_options: Any) -> FTNModel:
    """FTN on a frozen ``encoder``: every conv adapted, a norm copy and a decoder per task.

    ``rank`` is one rank for all tasks or ``{task: rank}``. ``seed`` (optional) seeds each task's
    head and factors with ``seed + index`` so a task's initialisation does not depend on which
    tasks were added before it. The encoder is modified in place (wrapped, frozen).
    """
    ranks = {t: (rank[t] if isinstance(rank, Mapping) else rank) for t in tasks}
    model = FTNModel(encoder, rank=max(ranks.values()) if ranks else 1, **ftn_options)
    for i, task in enumerate(tasks):
        if seed is not None:
            torch.manual_seed(seed + i)
        model.add_task(task, head=build_head(encoder, task, num_classes, **dict(head_kwargs or {})),
                       rank=ranks[task])
    return model


class SingleTaskNet(nn.Module):
    """Encoder + one decoder, everything trainable: the single-task (full fine-tuning) baseline."""

    def __init__(self, encoder: DenseEncoder, head: DenseHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.task = head.task

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


class MultiTaskNet(nn.Module):
    """One trainable encoder shared by one decoder per task: ``forward(x) = {task: map}``, or one
    task's map with ``task=``. The encoder runs once per call."""

    def __init__(self, encoder: DenseEncoder, heads: Mapping[str, DenseHead]) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))

    @property
    def tasks(self) -> list[str]:
        return list(self.heads.keys())

    def forward(self, x: Tensor, task: str | None = None) -> Tensor | dict[str, Tensor]:
        feats = self.encoder(x)
        if task is not None:
            return self.heads[task](feats)
        return {t: h(feats) for t, h in self.heads.items()}


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (not buffers) of ``module``, each shared tensor counted once."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def clone_encoder(encoder: DenseEncoder) -> DenseEncoder:
    """An independent copy (single-task networks each own one)."""
    return copy.deepcopy(encoder)
