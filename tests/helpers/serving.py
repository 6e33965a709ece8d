"""Helpers for the serving tests: small adapters on the ``tiny_convnet`` backbone (what
``ftn serve --backbone tiny_convnet --no-pretrained`` builds with seed 0) and test images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ftn import FTNModel
from ftn.training.backbones import build_backbone

SERVER_ARGS = ["--backbone", "tiny_convnet", "--no-pretrained", "--seed", "0", "--threads", "1"]
SIZE = 16


def tiny_model() -> FTNModel:
    torch.manual_seed(0)  # as `ftn serve/predict --no-pretrained --seed 0` does
    backbone, _ = build_backbone("tiny_convnet", pretrained=False)
    return FTNModel(backbone, rank=2).eval()


def make_adapters(folder: Path, names: list[str], classes: int = 5, seed: int = 1) -> dict[str, Path]:
    """One adapter per name with random (non-zero) factors, norms and head, labels and input."""
    model = tiny_model()
    g = torch.Generator().manual_seed(seed)
    paths = {}
    for name in names:
        model.add_task(name, head=nn.Linear(64, classes))
        with torch.no_grad():
            for key, p in model.named_task_parameters(name):
                scale = 1.0 if key.startswith("norm.") and key.endswith("weight") else 0.0
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + scale)
        info = {"labels": [f"{name}-class{i}" for i in range(classes)],
                "input": {"size": SIZE, "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                          "resize": "stretch"}}
        paths[name] = model.save_task(name, folder / f"{name}.safetensors", info=info)
    return paths


def png_bytes(seed: int, size: int = 20, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def solid_png(size: int) -> bytes:
    """A large image that compresses to a small file (a few hundred bytes)."""
    buf = io.BytesIO()
    Image.new("L", (size, size), 128).save(buf, format="PNG")
    return buf.getvalue()
