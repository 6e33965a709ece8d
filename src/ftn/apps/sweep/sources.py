"""Where ``ftn sweep`` gets each method's base config: a YAML file, or one of the three embedded
demos (the demos' own config builders, so a sweep runs exactly what ``ftn demo`` runs, plus a
validation split for choosing the learning rate).

- ``multidomain``: :func:`ftn.settings.classification.demo.demo_config` (the embedded benchmark has a validation split).
- ``dense``: :func:`ftn.settings.dense.demo.dense_demo_config` on the demo's rendered scenes; the last
  20 % of the training scenes are held out as the validation split (``sweep_val``), the demo's
  test split (NYUD's ``val``) stays the test split. ``full`` and ``taps`` use the single-task
  variant's rate.
- ``text``: :func:`ftn.settings.text.demo.text_demo_config` with the file's validation split
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

from ...training.config import ExperimentConfig, load_config
from ...training.methods import method_class

__all__ = ["DEMOS", "demo_base", "config_base", "prepare_dense_scenes"]

DEMOS = ("multidomain", "dense", "text")
_VAL_FRACTION = 0.2  # dense: training scenes held out for validation


def _full_size(method: str) -> bool:
    return method_class(method).full_size_update


def config_base(path: str | Path, overrides: Sequence[str]) -> Callable[[str], ExperimentConfig]:
    given_lr = any(o.split("=", 1)[0].strip() == "train.lr" for o in overrides)

    def base(method: str) -> ExperimentConfig:
        own = method_class(method).default_lr
        lr = [] if given_lr or own is None else [f"train.lr={own}"]
        return load_config(path, [f"method.name={method}", *lr, *overrides])
    return base


def prepare_dense_scenes(output: Path, quick: bool) -> Path:
    """Render the dense demo's scenes under ``output/scenes`` (once) and write the sweep's
    ``sweep_train`` / ``sweep_val`` lists (the training scenes, the last 20 % held out)."""
    from ...settings.dense.demo import FULL, QUICK
    from ...settings.dense.scenes import write_nyud_layout

    size = QUICK if quick else FULL
    root = output / "scenes"
    sets = root / "gt_sets"
    marker = root / f".rendered-{size['n_train']}-{size['n_val']}-{size['size']}"
    if not marker.is_file():
        write_nyud_layout(root, size["n_train"], size["n_val"], size=(size["size"], size["size"]), seed=0, workers=2)
        marker.touch()
    ids = [line.strip() for line in (sets / "train.txt").read_text().splitlines() if line.strip()]
    n_val = max(2, int(round(len(ids) * _VAL_FRACTION)))
    (sets / "sweep_train.txt").write_text("\n".join(ids[:-n_val]) + "\n")
    (sets / "sweep_val.txt").write_text("\n".join(ids[-n_val:]) + "\n")
    return root


def demo_base(name: str, output: str | Path, quick: bool, overrides: Sequence[str]
              ) -> Callable[[str], ExperimentConfig]:
    """Method → the config the demo ``name`` trains it with (``overrides`` applied last)."""
    output = Path(output)
    extra = list(overrides)
    if name == "multidomain":
        from ...settings.classification.demo import demo_config

        return lambda method: demo_config(method, output / "base", quick, extra)
    if name == "dense":
        from ...settings.dense.demo import dense_demo_config

        prepare_dense_scenes(output, quick)
        split = ["data.train_split=sweep_train", "data.val_split=sweep_val"]
        return lambda method: dense_demo_config(output, "single" if _full_size(method) else "ftn", quick,
                                                [f"method.name={method}", *split, *extra])
    if name == "text":
        from ...settings.text.demo import VARIANTS, text_demo_config

        val = [f"data.val_limit={32 if quick else 200}"]
        return lambda method: text_demo_config(output, method if method in VARIANTS else
                                               "full" if _full_size(method) else "ftn", quick,
                                               [f"method.name={method}", *val, *extra])
    from ...core.errors import ConfigError, did_you_mean

    raise ConfigError(f"--demo must be one of {list(DEMOS)}, got {name!r}" + did_you_mean(name, DEMOS))
