"""``ftn sweep``'s plan: the ``--grid`` / ``--tune`` axes, the learning-rate grids (and their
extension beyond an edge choice), the checks of a sweep's names and values, and the list of runs
(a config and a folder each) that :func:`~ftn.apps.sweep.run.run_sweep` trains."""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...core.errors import ConfigError
from ...training.config import ExperimentConfig, apply_overrides
from ...training.methods import method_class

__all__ = ["Axis", "SweepSpec", "Run", "parse_axis", "parse_lr_grid", "lr_grids", "plan", "DEFAULT_LR_FACTORS",
           "DEFAULT_LR_EXTEND", "QUICK"]

#: Default learning-rate grid: each method's own rate (from its base config) times these. Three
#: rates, so a choice can be interior; a choice at an edge extends the grid (``DEFAULT_LR_EXTEND``).
DEFAULT_LR_FACTORS = (0.5, 1.0, 2.0)
#: When the chosen rate is the grid's lowest or highest, the sweep trains one more rate beyond it
#: (the grid's own ratio between neighbours) and chooses again, at most this many times in each
#: direction; a choice still at an edge then is reported (``lr_at_edge``).
DEFAULT_LR_EXTEND = 2
#: ``--quick``: two steps per task on a small slice (CI).
QUICK = ["train.max_steps=2", "train.epochs=1", "data.train_limit=32", "data.val_limit=16", "data.test_limit=32",
         "train.recalibrate_batches=2", "train.warmup_steps=0"]
#: Keys a grid axis may not set: the sweep sets them itself.
_RESERVED = {"method.name": "--methods", "seed": "--seeds", "train.lr": "--lr-grid", "output_dir": "--output",
             "train.resume": "the sweep (always true)", "train.evaluate_test": "the sweep",
             "train.keep_checkpoints": "the sweep (false: a finished run's checkpoints are deleted)"}


# ----------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class Axis:
    """One ``--grid`` axis: a config key, its values (override strings) and the methods it applies
    to (None: every method)."""

    key: str
    values: tuple[str, ...]
    methods: tuple[str, ...] | None = None

    def applies(self, method: str) -> bool:
        return self.methods is None or method in self.methods


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets (``data.crop=[48,48],[64,64]`` has two values)."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{(" and 1 or (-1 if ch in "]})" else 0)
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def parse_axis(text: str) -> Axis:
    """``[method,method:]key=v1,v2,...``: e.g. ``ftn:method.ftn.rank=1,2,4`` or ``train.epochs=3,5``."""
    key, sep, values = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--grid {text!r} is not of the form [method,...:]key=v1,v2,...")
    methods = None
    if ":" in key:
        names, _, key = key.partition(":")
        methods = tuple(m.strip() for m in names.split(",") if m.strip())
    key = key.strip()
    if key in _RESERVED:
        raise ConfigError(f"--grid {key}: set by {_RESERVED[key]}, not a grid axis")
    vals = tuple(_split_top(values))
    if not vals:
        raise ConfigError(f"--grid {text!r} has no values")
    if len(set(vals)) != len(vals):
        raise ConfigError(f"--grid {key}: repeated values {list(vals)}")
    return Axis(key, vals, methods)


def _lr_text(lr: float) -> str:
    return f"{lr:.3g}"


def parse_lr_grid(items: Sequence[str]) -> dict[str, list[float]]:
    """``method=lr1,lr2,...`` items → {method: rates}."""
    grids: dict[str, list[float]] = {}
    for item in items:
        method, sep, values = item.partition("=")
        try:
            rates = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            rates = []
        if not sep or not method.strip() or not rates or any(r <= 0 for r in rates):
            raise ConfigError(f"--lr-grid {item!r} is not of the form method=lr1,lr2,... (positive numbers)")
        grids[method.strip()] = [float(_lr_text(r)) for r in rates]
    return grids


def lr_grids(methods: Sequence[str], base_lr: dict[str, float], given: dict[str, list[float]] | None = None,
             factors: Sequence[float] = DEFAULT_LR_FACTORS) -> dict[str, list[float]]:
    """Each method's learning rates: the given ones, else its base rate × ``factors``. Every
    method gets the same number of rates (a fair search)."""
    given = given or {}
    unknown = sorted(set(given) - set(methods))
    if unknown:
        raise ConfigError(f"--lr-grid names method(s) {unknown} that are not in --methods {list(methods)}")
    grids = {m: given.get(m) or sorted({float(_lr_text(base_lr[m] * f)) for f in factors}) for m in methods}
    sizes = {m: len(g) for m, g in grids.items()}
    if len(set(sizes.values())) > 1:
        raise ConfigError(f"every method needs the same number of learning rates, got {sizes}")
    return grids

# ----------------------------------------------------------------------------- runs
@dataclass
class Run:
    method: str
    point: tuple[tuple[str, str], ...]  # (key, value) of each axis that applies to the method
    lr: float
    seed: int
    cfg: ExperimentConfig
    folder: Path
    tuned: tuple[tuple[str, str], ...] = ()  # (key, value) of each --tune axis (chosen on validation)

    @property
    def tuned_name(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.tuned)

    @property
    def point_name(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.point) or "default"

    @property
    def group(self) -> tuple[str, str]:
        return self.method, self.point_name


def _folder_name(point: tuple[tuple[str, str], ...]) -> str:
    return "__".join(re.sub(r"[^A-Za-z0-9._=-]+", "_", f"{k}={v}") for k, v in point) or "default"


@dataclass
class SweepSpec:
    """What :func:`run_sweep` runs. ``base(method)`` is the method's config (any setting, the
    trailing overrides applied) and its own learning rate the default grid is centred on."""

    base: Callable[[str], ExperimentConfig]
    methods: list[str]
    output: Path
    axes: list[Axis] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    lr_grid: dict[str, list[float]] = field(default_factory=dict)  # given rates (others: factors)
    lr_factors: tuple[float, ...] = DEFAULT_LR_FACTORS
    lr_extend: int = DEFAULT_LR_EXTEND  # extensions of an edge choice per direction (0: none)
    # Hyper-parameters chosen on validation with the learning rate (the product of their values and
    # the LR grid is searched with the first seed), e.g. TAPS's λ: taps:method.taps.penalty=0.1,1,10.
    tune: list[Axis] = field(default_factory=list)
    workers: int = 1
    reference: str | None = None  # compared against every other method (default: ftn, else the first)
    # Also compare, within each method, grid points that differ only in this axis: its first
    # value (the reference) against each other value, e.g. budget allocation auto vs uniform.
    compare_axis: str | None = None
    # The group the multi-task gain Δm is measured against ("full[data.joint=false]": method
    # and grid point), for settings with headline metrics per task (dense); None: no Δm.
    gain_reference: str | None = None
    progress: bool = True
    command: str = ""
    bootstrap: int = 2000


def _check(spec: SweepSpec) -> dict[str, ExperimentConfig]:
    """Validate names and every axis value against each method's config (errors name the key)."""
    if not spec.methods:
        raise ConfigError("--methods is empty")
    if len(set(spec.methods)) != len(spec.methods):
        raise ConfigError(f"--methods lists a method twice: {spec.methods}")
    if not spec.seeds or len(set(spec.seeds)) != len(spec.seeds):
        raise ConfigError(f"--seeds must be distinct and non-empty, got {spec.seeds}")
    for m in spec.methods:
        try:
            method_class(m)  # unknown names fail with the registry's names
        except ConfigError as exc:
            raise ConfigError(f"--methods: {exc}") from None
    keys = [a.key for a in spec.axes + spec.tune]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"a --grid / --tune key is given twice: {keys}")
    if spec.lr_extend < 0:
        raise ConfigError(f"--lr-extend must be >= 0, got {spec.lr_extend}")
    for axis in spec.axes + spec.tune:
        for m in axis.methods or ():
            if m not in spec.methods:
                raise ConfigError(f"--grid/--tune {m}:{axis.key}: method {m!r} is not in --methods {spec.methods}")
    if spec.reference is not None and spec.reference not in spec.methods:
        raise ConfigError(f"--reference {spec.reference!r} is not in --methods {spec.methods}")
    if spec.compare_axis is not None and spec.compare_axis not in {a.key for a in spec.axes}:
        raise ConfigError(f"--compare-axis {spec.compare_axis!r} is not a --grid axis "
                          f"({sorted(a.key for a in spec.axes) or 'none given'})")
    bases = {m: spec.base(m) for m in spec.methods}
    for m, cfg in bases.items():
        for axis in spec.axes + spec.tune:
            if axis.applies(m):
                for value in axis.values:
                    try:
                        apply_overrides(copy.deepcopy(cfg), [f"{axis.key}={value}"])
                    except ConfigError as exc:
                        raise ConfigError(f"--grid {axis.key}={value} (method {m}): {exc}") from None
    return bases


def _run_config(base: ExperimentConfig, point: tuple[tuple[str, str], ...], lr: float, seed: int,
                folder: Path) -> ExperimentConfig:
    """The base config at a grid point, learning rate and seed. ``train.head_lr`` (when set)
    moves with ``train.lr`` by the same factor, keeping the base config's ratio (so the linear
    probe, whose only parameters are its head, is searched too)."""
    cfg = apply_overrides(copy.deepcopy(base), [f"{k}={v}" for k, v in point])
    overrides = [f"train.lr={lr!r}", f"seed={seed}", f"output_dir={folder}", "train.resume=true",
                 "train.evaluate_test=false", "train.keep_checkpoints=false", f"name={base.method.name}-{_folder_name(point)}-lr{_lr_text(lr)}-s{seed}"]
    if cfg.train.head_lr is not None:
        overrides.append(f"train.head_lr={cfg.train.head_lr * lr / cfg.train.lr!r}")
    return apply_overrides(cfg, overrides)


def plan(spec: SweepSpec, bases: dict[str, ExperimentConfig], grids: dict[str, list[float]]
         ) -> dict[tuple[str, str], dict[str, Any]]:
    """The groups (method, grid point): the point, the search runs (first seed: every learning
    rate of the grid × every combination of the --tune values) and a maker of runs
    (``make(lr, seed, tuned)``) for the extended rates and the other seeds."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for m in spec.methods:
        axes = [a for a in spec.axes if a.applies(m)]
        tune = [a for a in spec.tune if a.applies(m)]
        for values in itertools.product(*(a.values for a in axes)):
            point = tuple((a.key, v) for a, v in zip(axes, values))
            root = spec.output / "runs" / m / _folder_name(point)

            def make(lr: float, seed: int, tuned: tuple[tuple[str, str], ...] = (), m: str = m, point=point,
                     root: Path = root) -> Run:
                folder = (root / _folder_name(tuned) if tuned else root) / f"lr{_lr_text(lr)}" / f"seed{seed}"
                return Run(m, point, lr, seed, _run_config(bases[m], point + tuned, lr, seed, folder), folder, tuned)

            combos = [tuple((a.key, v) for a, v in zip(tune, vs)) for vs in itertools.product(*(a.values for a in tune))]
            search = [make(lr, spec.seeds[0], tuned) for tuned in combos for lr in grids[m]]
            groups[search[0].group] = {"method": m, "point": point, "search": search, "make": make,
                                       "lr_extended": [], "extensions": {"up": 0, "down": 0}}
    return groups

def _extensions(groups: dict[tuple[str, str], dict[str, Any]], spec: SweepSpec) -> list[Run]:
    """One more rate beyond the edge for every group whose chosen rate is its grid's lowest or
    highest (at the chosen tuned values), while the limit allows; returns the new runs."""
    new = []
    for g in groups.values():
        rates = sorted(g["val_scores"])
        if spec.lr_extend == 0 or len(rates) < 2:
            continue
        if g["lr"] == rates[-1] and g["extensions"]["up"] < spec.lr_extend:
            lr, side = float(_lr_text(rates[-1] * rates[-1] / rates[-2])), "up"
        elif g["lr"] == rates[0] and g["extensions"]["down"] < spec.lr_extend:
            lr, side = float(_lr_text(rates[0] * rates[0] / rates[1])), "down"
        else:
            continue
        g["extensions"][side] += 1
        g["lr_extended"].append(lr)
        run = g["make"](lr, spec.seeds[0], g["tuned"])
        g["search"].append(run)
        new.append(run)
    return new

