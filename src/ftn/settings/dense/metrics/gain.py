"""The multi-task gain Δm of a multi-task model against single-task baselines."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from ....core.errors import ConfigError
from .depth import DepthMeter
from .edges import EdgeMeter
from .normals import NormalsMeter
from .segmentation import SegmentationMeter

__all__ = ["DEFAULT_DIRECTIONS", "multi_task_gain"]

#: Whether higher (+1) or lower (−1) is better, for the metric names the four meters produce
#: (each meter's ``DIRECTIONS``).
DEFAULT_DIRECTIONS: dict[str, int] = {
    **SegmentationMeter.DIRECTIONS,
    **DepthMeter.DIRECTIONS,
    **NormalsMeter.DIRECTIONS,
    **EdgeMeter.DIRECTIONS,
}

_WORDS = {"higher": 1, "max": 1, "+": 1, "lower": -1, "min": -1, "-": -1}


def multi_task_gain(
    multi: Mapping[str, float],
    single: Mapping[str, float],
    directions: Mapping[str, int | str] | None = None,
    metrics: Iterable[str] | None = None,
) -> float:
    """Δm = (1/T) Σ_t s_t (M_t − M_single,t) / M_single,t, as a fraction (× 100 for %).

    ``multi`` and ``single`` map metric names to the multi-task and single-task values; ``T`` is
    the metrics in ``metrics`` (default: every key of ``multi``). ``s_t`` comes from
    ``directions`` (default :data:`DEFAULT_DIRECTIONS`): +1 / ``"higher"`` where higher is
    better (mIoU, odsF), −1 / ``"lower"`` where lower is better (RMSE, angle error). With one
    metric per task (the usual NYUD table: mIoU, rmse, mean_angle, odsF) this is the per-task Δm.
    """
    table = DEFAULT_DIRECTIONS if directions is None else directions
    names = list(multi) if metrics is None else list(metrics)
    if not names:
        raise ConfigError("multi_task_gain needs at least one metric")
    total = 0.0
    for name in names:
        if name not in multi or name not in single:
            raise ConfigError(f"metric {name!r} missing from the multi-task or single-task results")
        if name not in table:
            raise ConfigError(f"no direction (higher/lower is better) known for metric {name!r}")
        s = table[name]
        sign = _WORDS.get(s.lower()) if isinstance(s, str) else (1 if s > 0 else -1 if s < 0 else None)
        if sign is None:
            raise ConfigError(f"direction of {name!r} must be +1/-1 or 'higher'/'lower', got {s!r}")
        base = float(single[name])
        if base == 0.0 or not math.isfinite(base):
            raise ConfigError(f"single-task value of {name!r} is {base}; the relative gain is undefined")
        total += sign * (float(multi[name]) - base) / base
    return total / len(names)
