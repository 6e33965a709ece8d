"""The pre-tokenized text tasks: ``load_text_tasks()`` → ``{task: {split: TextSplit}}`` and metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...core.errors import DataError

__all__ = ["TEXT_TASKS_FILE", "TextSplit", "load_text_tasks", "collate"]

TEXT_TASKS_FILE = Path(__file__).resolve().parent / "assets" / "text_tasks_v1.npz"


@dataclass
class TextSplit:
    """Token ids (N × max_len, int64, padded with 0), real lengths (N) and labels (N)."""

    ids: Tensor
    lengths: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """One example, ``(ids, length, label)`` (a Dataset for torch's DataLoader; see :func:`collate`)."""
        return self.ids[i], self.lengths[i], self.labels[i]

    def subset(self, n: int | None = None, max_len: int | None = None) -> TextSplit:
        """The first ``n`` examples (the file's order is already random), optionally cut to
        ``max_len`` tokens."""
        n = len(self) if n is None else min(n, len(self))
        ids, lengths = self.ids[:n], self.lengths[:n]
        if max_len is not None and max_len < ids.shape[1]:
            ids, lengths = ids[:, :max_len], lengths.clamp(max=max_len)
        return TextSplit(ids, lengths, self.labels[:n])

    def by_length(self) -> TextSplit:
        """The same examples, shortest first: batches of similar lengths need little padding."""
        order = torch.argsort(self.lengths, stable=True)
        return TextSplit(self.ids[order], self.lengths[order], self.labels[order])

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(ids, attention_mask, labels)`` for ``index``, padded only to the longest in the batch."""
        lengths = self.lengths[index]
        width = int(lengths.max())
        ids = self.ids[index, :width]
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return ids, mask, self.labels[index]


def collate(examples: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """DataLoader collate of :meth:`TextSplit.__getitem__` examples: ``(ids, attention_mask,
    labels)`` padded only to the longest example of the batch."""
    ids, lengths, labels = (torch.stack(column) for column in zip(*examples))
    return TextSplit(ids, lengths, labels).batch(torch.arange(len(labels)))


def load_text_tasks(path: str | Path | None = None) -> tuple[dict[str, dict[str, TextSplit]], dict[str, Any]]:
    """Read the benchmark file (default: the one shipped with ftn)."""
    path = Path(path) if path is not None else TEXT_TASKS_FILE
    if not path.exists():
        raise DataError(f"text benchmark file not found: {path}; rebuild it with tools/build_text_benchmark.py")
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(bytes(data["meta"]).decode())
        tasks: dict[str, dict[str, TextSplit]] = {}
        for task in meta["tasks"]:
            tasks[task] = {
                split: TextSplit(torch.from_numpy(data[f"{task}/{split}/ids"].astype(np.int64)),
                                 torch.from_numpy(data[f"{task}/{split}/len"].astype(np.int64)),
                                 torch.from_numpy(data[f"{task}/{split}/labels"].astype(np.int64)))
                for split in ("train", "val", "test")
            }
    return tasks, meta
