"""Where ``ftn sweep`` gets each method's base config: a YAML file, or a setting's demo (the
demo's own config builder, its ``Demo.sweep`` in :mod:`ftn.training.settings_registry`, so a
sweep runs exactly what ``ftn demo`` runs, plus a validation split for choosing the learning
rate). The demos of this project:

- ``multidomain``: :func:`ftn.settings.classification.sweep_configs` (the embedded benchmark has a
  validation split).
- ``dense``: :func:`ftn.settings.dense.sweep_configs` on the demo's rendered scenes; the last
  20 % of the training scenes are held out as the validation split (``sweep_val``), the demo's
  test split (NYUD's ``val``) stays the test split. ``full`` and ``taps`` use the single-task
  variant's rate.
- ``text``: :func:`ftn.settings.text.sweep_configs` with the file's validation split
  (``data.val_limit``: 200 examples per task, 32 with ``--quick``); ``taps`` uses full
  fine-tuning's rate.

Each method starts from its own learning rate (the demos' hand-set rates; for a YAML file, the
method class's ``default_lr`` where it has one, else the file's ``train.lr``), which the default
LR grid is centred on. Methods with a full-size update per layer (``Method.full_size_update``:
full fine-tuning, TAPS) start from full fine-tuning's variant in the dense and text demos.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ...core.errors import ConfigError
from ...training.config import ExperimentConfig, load_config
from ...training.methods import method_class
from ...training.settings_registry import demo_entry, resolve

__all__ = ["demo_base", "config_base"]


def config_base(path: str | Path, overrides: Sequence[str]) -> Callable[[str], ExperimentConfig]:
    given_lr = any(o.split("=", 1)[0].strip() == "train.lr" for o in overrides)

    def base(method: str) -> ExperimentConfig:
        own = method_class(method).default_lr
        lr = [] if given_lr or own is None else [f"train.lr={own}"]
        return load_config(path, [f"method.name={method}", *lr, *overrides])
    return base


def demo_base(name: str, output: str | Path, quick: bool, overrides: Sequence[str]
              ) -> Callable[[str], ExperimentConfig]:
    """Method → the config the demo ``name`` trains it with (``overrides`` applied last)."""
    entry = demo_entry(name)
    if entry.demo is None or entry.demo.sweep is None:
        raise ConfigError(f"the {entry.name} setting's demo has no sweep (Demo.sweep)")
    return resolve(entry.demo.sweep)(Path(output), quick, list(overrides))
