"""Statistics of repeated runs (NumPy only): mean ± standard deviation over seeds and paired
intervals for the difference between two methods.

- :func:`paired_bootstrap`: the two methods' runs are paired by seed and evaluated on the same
  test examples. Each bootstrap replicate resamples the seeds (with replacement) and, per task,
  the test examples (with replacement, the *same* examples for both methods); each method's
  score is recomputed from its per-example statistics summed over the resampled examples, and
  the replicate's value is the difference of the two scores averaged over the resampled seeds.
  The interval is the percentile interval of the replicates.
- :func:`paired_t_interval`: where per-example statistics are not available, a t-interval of
  the per-seed differences (over seeds only; needs two seeds or more).

An interval is *significant* when it excludes 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["Interval", "mean_std", "paired_bootstrap", "paired_t_interval", "t_quantile"]

# Two-sided 95 % quantiles of Student's t, df = 1..30 (beyond: the normal's 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


@dataclass
class Interval:
    """A difference (a − b), its 95 % interval and how it was obtained."""

    diff: float
    low: float | None
    high: float | None
    kind: str  # "bootstrap" (seeds and test examples) | "t over seeds" | "none"
    seeds: int

    @property
    def significant(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "significant": self.significant}


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation (0 for one value), count)."""
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan, 0
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0, int(x.size)


def t_quantile(df: int) -> float:
    """The two-sided 95 % quantile of Student's t with ``df`` degrees of freedom."""
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


def paired_t_interval(a: Sequence[float], b: Sequence[float]) -> Interval:
    """t-interval of the per-seed differences ``a[i] − b[i]`` (seeds paired by position)."""
    if len(a) != len(b):
        raise ValueError("paired scores need the same seeds")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.size < 2:
        return Interval(float(d.mean()) if d.size else math.nan, None, None, "none", int(d.size))
    half = t_quantile(d.size - 1) * float(d.std(ddof=1)) / math.sqrt(d.size)
    return Interval(float(d.mean()), float(d.mean()) - half, float(d.mean()) + half, "t over seeds", int(d.size))


ScoreFn = Callable[[str, np.ndarray], float]  # (task, summed statistics) → the task's score


def _run_score(stats: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray] | None, score: ScoreFn) -> float:
    """Mean over tasks of the score of the (weighted) summed per-example statistics."""
    total = 0.0
    for task, s in stats.items():
        summed = s.sum(0) if weights is None else weights[task] @ s
        total += score(task, summed)
    return total / len(stats)


def paired_bootstrap(a: Sequence[Mapping[str, np.ndarray]], b: Sequence[Mapping[str, np.ndarray]], score: ScoreFn,
                     replicates: int = 2000, seed: int = 0, level: float = 0.95,
                     shared_examples: bool = False) -> Interval:
    """Bootstrap interval of score(a) − score(b) over seeds and test examples.

    ``a[i]`` and ``b[i]`` are the per-example statistics (task → ``(n_examples, k)``) of the two
    methods' runs with the same seed, on the same test examples in the same order. A run's score
    is the mean over tasks of ``score(task, column sums)``. ``shared_examples``: every task's row
    i is the same example (dense tasks on one image), so one resample of the examples serves
    all tasks; otherwise each task's examples are resampled on their own."""
    if len(a) != len(b) or not a:
        raise ValueError("paired bootstrap needs the same (non-empty) list of seeds for both methods")
    tasks = list(a[0])
    for runs in (a, b):
        for r in runs:
            if list(r) != tasks:
                raise ValueError("every run must have the same tasks")
            for t in tasks:
                if r[t].shape[0] != a[0][t].shape[0]:
                    raise ValueError(f"task {t!r}: runs were evaluated on different numbers of examples")
    observed = float(np.mean([_run_score(x, None, score) - _run_score(y, None, score) for x, y in zip(a, b)]))
    rng = np.random.default_rng(seed)
    n_seeds = len(a)
    sizes = {t: a[0][t].shape[0] for t in tasks}
    if shared_examples and len(set(sizes.values())) > 1:
        raise ValueError("shared_examples needs the same number of examples in every task")
    values = np.empty(replicates)
    for r in range(replicates):
        seeds = rng.integers(0, n_seeds, n_seeds)
        if shared_examples:
            n = sizes[tasks[0]]
            one = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
            weights = {t: one for t in tasks}
        else:
            weights = {t: np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
                       for t, n in sizes.items()}
        values[r] = np.mean([_run_score(a[i], weights, score) - _run_score(b[i], weights, score) for i in seeds])
    tail = (1 - level) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return Interval(observed, float(low), float(high), "bootstrap", n_seeds)
