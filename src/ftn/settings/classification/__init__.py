"""Datasets: the embedded multi-domain benchmark and real-world folder layouts.

``SETTING`` declares the classification setting to :mod:`ftn.training.settings_registry`: its
class, its score, and its demo (``ftn demo``, ``ftn sweep --demo multidomain``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ...training.settings_registry import Demo, SettingEntry

if TYPE_CHECKING:
    from ...training.config import ExperimentConfig

__all__ = ["SETTING", "sweep_configs"]


def sweep_configs(output: str | Path, quick: bool, overrides: Sequence[str]) -> Callable[[str], ExperimentConfig]:
    """``ftn sweep --demo multidomain``: method → the demo's config (the embedded benchmark has a
    validation split), run folders under ``output/base``."""
    from .demo import demo_config

    output, extra = Path(output), list(overrides)
    return lambda method: demo_config(method, output / "base", quick, extra)


SETTING = SettingEntry(
    name="classification",
    setting="ftn.settings.classification.setting:ClassificationSetting",
    score="top-1 accuracy (%), mean over tasks",
    headline="top-1 {acc:.2f}%",
    demo=Demo(name="multidomain", help="the embedded multi-domain benchmark (the default)", output="outputs/demo",
              run="ftn.settings.classification.demo:run_demo", table="ftn.settings.classification.demo:format_table",
              sweep="ftn.settings.classification:sweep_configs", methods=True,
              done="wall time {results[wall_seconds]:.0f} s; results, table and plot in {output}"),
)
