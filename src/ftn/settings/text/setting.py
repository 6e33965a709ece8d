"""The text setting: text classification tasks on the pretrained all-MiniLM-L6-v2 (offline).

Every task is a ``Linear(384, classes)`` head on the mean-pooled token embeddings
(:class:`~ftn.settings.text.backbone.MeanPooler`), trained with cross-entropy on padded token batches
(dynamic padding: each batch is padded to its longest example) and scored by top-1 accuracy.
The tasks are the pre-tokenized ones shipped in ``assets/text_tasks_v1.npz``
(``docs/data-card-text.md``) or another file of that format (``data.path``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ...core.errors import ConfigError
from ...training.config import DataConfig, ExperimentConfig, ModelConfig
from ...training.setting import Classify, Setting, TaskData, mean_accuracy
from .data import TextSplit, collate, load_text_tasks

__all__ = ["TextDataConfig", "TextModelConfig", "TextSetting", "MINILM"]

MINILM = "all-MiniLM-L6-v2"


@dataclass
class TextDataConfig(DataConfig):
    path: str | None = None  # None: the benchmark file shipped with ftn
    tasks: list[str] | None = None  # None: every task in the file
    max_len: int = 64  # tokens (the shipped file holds up to 64)
    train_limit: int | None = 320  # the first N examples of a split (the file's order is random)
    val_limit: int | None = 0  # 0: no validation (the last epoch is kept)
    test_limit: int | None = 400
    batch_size: int = 16
    eval_batch_size: int = 64


@dataclass
class TextModelConfig(ModelConfig):
    backbone: str = MINILM


class TextSetting(Setting):
    name = "text"
    data_config = TextDataConfig
    model_config = TextModelConfig

    @classmethod
    def validate(cls, cfg: ExperimentConfig) -> None:
        m = cfg.model
        if m.backbone.startswith("hf:"):
            pass  # any Hugging Face text encoder (its tokenizer must be the data's: BERT uncased here)
        elif m.backbone != MINILM or not m.pretrained or m.weights_path:
            raise ConfigError(f"the text setting uses the pretrained {MINILM} (model.backbone={MINILM}, "
                              f"model.pretrained=true, no model.weights_path) or a Hugging Face text encoder "
                              f"(model.backbone=hf:PATH_OR_ID)")
        if cfg.data.max_len < 2:
            raise ConfigError("data.max_len must be >= 2")

    def _file(self) -> tuple[dict[str, dict[str, TextSplit]], dict[str, Any]]:
        if not hasattr(self, "_loaded"):
            self._loaded = load_text_tasks(self.cfg.data.path)
        return self._loaded

    def tasks(self) -> list[str]:
        splits, _ = self._file()
        names = self.cfg.data.tasks if self.cfg.data.tasks is not None else list(splits)
        missing = [t for t in names if t not in splits]
        if missing:
            raise ConfigError(f"unknown text task(s) {missing}; the file has {list(splits)}")
        return list(names)

    def task_seed(self, index: int) -> int:
        return self.cfg.seed

    def backbone(self) -> nn.Module:
        from .backbone import MeanPooler, load_minilm

        m = self.cfg.model
        if m.backbone == MINILM:
            self.encoder = MeanPooler(load_minilm())
            return self.encoder
        from ...training.backbones import build_backbone

        encoder, _ = build_backbone(m.backbone, pretrained=m.pretrained, weights_path=m.weights_path)
        if not isinstance(encoder, MeanPooler):
            raise ConfigError(f"{m.backbone} is not a text encoder (it does not take input_ids)")
        self.encoder = encoder
        return self.encoder

    def data(self, task: str) -> TaskData:
        splits, meta = self._file()
        if task not in splits:
            raise ConfigError(f"unknown text task {task!r}; the file has {list(splits)}")
        d = self.cfg.data

        def part(split: str, limit: int | None) -> TextSplit | None:
            return None if limit == 0 else splits[task][split].subset(limit, d.max_len)

        val, test = part("val", d.val_limit), part("test", d.test_limit)
        classes = meta["tasks"][task]["classes"]
        info = {"labels": [str(c) for c in classes]}  # saved with the adapter (no image input preparation)
        return TaskData(task, part("train", d.train_limit), val and val.by_length(), test and test.by_length(),
                        Classify(len(classes), task), collate=collate, info=info)

    def head(self, data: TaskData) -> nn.Module:
        return nn.Linear(self.encoder.dim, data.objective.num_classes)

    def summarize(self, results: dict[str, Any]) -> dict[str, Any]:
        splits, meta = self._file()
        d = self.cfg.data
        sizes = {t: {"classes": len(meta["tasks"][t]["classes"]), "train": len(splits[t]["train"].subset(d.train_limit)),
                     "test": len(splits[t]["test"].subset(d.test_limit)), "max_len": d.max_len} for t in results}
        return {**mean_accuracy(results), "task_sizes": sizes}
