"""Statistics of repeated runs (NumPy; SciPy's Student-t quantile when installed): mean ± standard
deviation over seeds and paired intervals for the difference between two methods.

- :func:`paired_interval`: the two methods' runs are paired by seed and evaluated on the same
  test examples, with per-example statistics. With d_i = score(a_i) − score(b_i) for seed i of n,
  the interval is

      mean(d) ± t_{level, df} · SE,   SE² = s_d² / n + V_test,   df = (n − 1) · SE² / (s_d² / n).

  - s_d² / n, the *seed* component: the sample variance of the per-seed differences over n. It
    holds everything that changes from one seed to the next — the training noise, including
    which borderline test examples a run happens to get right.
  - V_test, the *test-example* component: the test set is one draw of examples, the same for
    every seed, so a method × example interaction (examples that happen to suit one method)
    shifts every seed's d_i alike, and s_d² cannot see it. It is estimated by resampling the test
    examples (the same resample for both methods and every seed; one resample for all tasks when
    they share their examples) and taking the *covariance between seeds* of the resampled
    differences, averaged over the pairs of seeds: the part of the test-sampling noise that
    persists across seeds. The full variance of mean_i d_i under the resample would also count
    each seed's own example noise (which borderline examples a run gets right), which already
    varies from seed to seed and so is inside s_d²: counted twice, it makes the interval
    needlessly wide.
  - df: V_test is treated as known and only s_d² as estimated, with n − 1 degrees of freedom, so
    the df run from n − 1 (no test component) towards the normal (test component dominant).
    Welch–Satterthwaite's (n − 1) · (SE² / (s_d²/n))² squares the ratio: with s_d² from 2–4
    degrees of freedom, an s_d² small by chance then shrinks SE and inflates df at once, and in
    normal theory it calls up to 7.8 % of null comparisons significant at 3 seeds (nominal 5 %);
    the unsquared ratio keeps 3.8–5.7 % at 3 to 5 seeds whatever the test component's share.

  Simulated false-positive rates (nominal 5 %; ``tests/training/test_stats.py``, numbers in
  ``docs/sweep.md``): about 5 % with 3 and 5 seeds where the seed spread dominates, and on the
  conservative side (2.5 %) where the test-example component dominates; the t over seeds alone
  then calls 12.5 %.

  Why not the bootstrap over seeds it replaces (each replicate resampled the seeds with
  replacement as well as the examples; percentile interval): 3 seeds have only 10 distinct
  resamples and the percentile interval no small-sample correction, so it behaves like a sign
  test: in the seed-driven simulation it called 15.5 % of null comparisons significant at a
  nominal 5 % with 3 seeds (11.5 % with 5). :func:`paired_bootstrap` is kept as the former name
  of :func:`paired_interval`.
- :func:`paired_t_interval`: where per-example statistics are not available, a t-interval of
  the per-seed differences (over seeds only: it cannot see the test-example component; needs two
  seeds or more).

An interval is *significant* when it excludes 0. With one seed there is no interval (kind
"none"). With 2 seeds s_d² has one degree of freedom and the level is not held well (up to
about 9 % false positives in normal theory): use 3 or more.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["Interval", "mean_std", "paired_bootstrap", "paired_interval", "paired_t_interval", "t_quantile"]

# Two-sided 95 % quantiles of Student's t, df = 1..30: the fallback when SciPy is not installed.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
_Z975 = 1.959964  # the normal's, df → ∞

# The df grow without bound as the seed component vanishes; beyond this the t quantile is the
# normal's to 4 decimals.
_MAX_DF = 1e5

# Bootstrap weights are built in chunks of at most this many entries (replicates × examples), so
# a large test set does not need a (replicates × examples) matrix at once.
_CHUNK_ENTRIES = 4_000_000

KIND_EXAMPLES = "t over seeds + test examples"
KIND_SEEDS = "t over seeds"


@dataclass
class Interval:
    """A difference (a − b), its interval at ``level`` and how it was obtained."""

    diff: float
    low: float | None
    high: float | None
    kind: str  # "t over seeds + test examples" | "t over seeds" | "none"
    seeds: int
    level: float = 0.95
    df: float | None = None  # the t's degrees of freedom (None: no interval)

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


def t_quantile(df: float, level: float = 0.95) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` (any real > 0) degrees of
    freedom: ``scipy.special.stdtrit`` (what ``scipy.stats.t.ppf`` evaluates, without importing
    scipy.stats) when SciPy is installed. Without SciPy only ``level=0.95`` is available: the
    table for integer df, log t interpolated linearly in 1/df between them and towards the normal's
    1.96 beyond df = 30 (within 0.5 % of the exact value for df ≥ 2, 3 % between 1 and 2, always
    on the wide side)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if not df > 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    try:
        from scipy.special import stdtrit
    except ImportError:
        return _t_table(df, level)
    return float(stdtrit(df, 0.5 + level / 2))


def _t_table(df: float, level: float) -> float:
    if not math.isclose(level, 0.95):
        raise ValueError(f"a {level:g} interval needs SciPy's t quantile: pip install scipy "
                         "(or 'factorized-tensor-networks[train]'); without it only level=0.95 is available")
    if df < 1:
        raise ValueError(f"without SciPy the t quantile needs df >= 1, got {df}")
    # log t is close to linear in 1/df (t ≈ z + (z³ + z) / (4 df) for large df).
    inv = [1 / k for k in range(1, len(_T975) + 1)] + [0.0]
    logs = [math.log(q) for q in _T975] + [math.log(_Z975)]
    return float(math.exp(np.interp(-1 / df, [-x for x in inv], logs)))


def paired_t_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """t-interval of the per-seed differences ``a[i] − b[i]`` (seeds paired by position)."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same seeds for both methods, got {len(a)} and {len(b)} scores")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.size < 2:
        return Interval(float(d.mean()) if d.size else math.nan, None, None, "none", int(d.size), level)
    half = t_quantile(d.size - 1, level) * float(d.std(ddof=1)) / math.sqrt(d.size)
    return Interval(float(d.mean()), float(d.mean()) - half, float(d.mean()) + half, KIND_SEEDS, int(d.size),
                    level, float(d.size - 1))


ScoreFn = Callable[[str, np.ndarray], float]  # (task, summed statistics) → the task's score
Runs = Sequence[Mapping[str, np.ndarray]]  # per seed: task → (n_examples, k) per-example statistics


def _run_score(stats: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray] | None, score: ScoreFn) -> float:
    """Mean over tasks of the score of the (weighted) summed per-example statistics."""
    total = 0.0
    for task, s in stats.items():
        summed = s.sum(0) if weights is None else weights[task] @ s
        total += score(task, summed)
    return total / len(stats)


def _check_runs(a: Runs, b: Runs, shared_examples: bool) -> dict[str, int]:
    """Task → number of test examples, after checking that the runs can be paired."""
    if len(a) != len(b) or not a:
        raise ValueError(f"a paired interval needs the same (non-empty) list of seeds for both methods, "
                         f"got {len(a)} and {len(b)} runs")
    tasks = list(a[0])
    if not tasks:
        raise ValueError("a paired interval needs at least one task")
    sizes = {t: a[0][t].shape[0] for t in tasks}
    for name, runs in (("a", a), ("b", b)):
        for i, r in enumerate(runs):
            if list(r) != tasks:
                raise ValueError(f"every run must have the same tasks in the same order: {name}[{i}] has "
                                 f"{list(r)}, a[0] has {tasks}")
            for t in tasks:
                if r[t].shape[0] != sizes[t]:
                    raise ValueError(f"task {t!r}: runs were evaluated on different numbers of examples "
                                     f"({name}[{i}] has {r[t].shape[0]}, a[0] has {sizes[t]})")
    if shared_examples and len(set(sizes.values())) > 1:
        raise ValueError(f"shared_examples needs the same number of examples in every task, got {sizes}")
    return sizes


def _resample_weights(rng: np.random.Generator, replicates: int, n: int) -> np.ndarray:
    """(replicates, n): how often each example is drawn in each resample of n with replacement."""
    draws = rng.integers(0, n, (replicates, n)) + n * np.arange(replicates)[:, None]
    return np.bincount(draws.ravel(), minlength=replicates * n).reshape(replicates, n).astype(np.float64)


def _resampled_differences(a: Runs, b: Runs, score: ScoreFn, sizes: dict[str, int], replicates: int,
                           seed: int, shared_examples: bool) -> np.ndarray:
    """(seeds, replicates): score(a_i) − score(b_i) with the examples resampled; replicate r uses
    the same resample for both methods and every seed (and every task when shared)."""
    rng = np.random.default_rng(seed)
    n_seeds, tasks = len(a), list(sizes)
    out = np.zeros((n_seeds, replicates))
    chunk = max(1, _CHUNK_ENTRIES // max(sum(sizes.values()), 1))
    for start in range(0, replicates, chunk):
        size = min(chunk, replicates - start)
        if shared_examples:
            one = _resample_weights(rng, size, sizes[tasks[0]])
            weights = {t: one for t in tasks}
        else:
            weights = {t: _resample_weights(rng, size, sizes[t]) for t in tasks}
        for t in tasks:
            w = weights[t]
            for i in range(n_seeds):
                # (size, k) summed statistics of every replicate at once; the score itself is a
                # Python function of one row (objectives compute metrics from one total).
                ta, tb = w @ a[i][t], w @ b[i][t]
                out[i, start:start + size] += [score(t, x) - score(t, y) for x, y in zip(ta, tb)]
    return out / len(tasks)


def _degrees_of_freedom(seed_var: Any, test_var: Any, n: int) -> Any:
    """(n − 1) · SE² / seed_var, SE² = seed_var + test_var (scalars or arrays): n − 1 with no test
    component, growing as it takes over (capped; no seed component: the cap). Not
    Welch–Satterthwaite's square of the ratio, which is liberal with 3 seeds (module docstring)."""
    seed_var, test_var = np.asarray(seed_var, dtype=np.float64), np.asarray(test_var, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(seed_var > 0, (seed_var + test_var) / seed_var, np.inf)
    return np.minimum((n - 1) * ratio, _MAX_DF)


def paired_interval(a: Runs, b: Runs, score: ScoreFn, replicates: int = 2000, seed: int = 0, level: float = 0.95,
                    shared_examples: bool = False) -> Interval:
    """Interval of score(a) − score(b) over seeds and test examples (see the module docstring).

    ``a[i]`` and ``b[i]`` are the per-example statistics (task → ``(n_examples, k)``) of the two
    methods' runs with the same seed, on the same test examples in the same order. A run's score
    is the mean over tasks of ``score(task, column sums)``. ``shared_examples``: every task's row
    j is the same example (dense tasks on one image), so one resample of the examples serves
    all tasks; otherwise each task's examples are resampled on their own. ``replicates``
    resamples of the examples estimate the test-example component; ``seed`` seeds them."""
    sizes = _check_runs(a, b, shared_examples)
    d = np.array([_run_score(x, None, score) - _run_score(y, None, score) for x, y in zip(a, b)])
    n = d.size
    if n < 2:  # no seed-to-seed spread to estimate
        return Interval(float(d.mean()), None, None, "none", n, level)
    if replicates < 2:
        raise ValueError(f"the test-example component needs at least 2 replicates, got {replicates}")
    seed_var = float(d.var(ddof=1)) / n
    boot = _resampled_differences(a, b, score, sizes, replicates, seed, shared_examples)
    # Between-seed covariance of the resampled differences, averaged over the n(n−1) ordered pairs
    # of seeds: the part of the test-sampling noise that every seed shares. (Each seed's own
    # example noise, the diagonal, already varies from seed to seed and is inside seed_var.)
    # A negative estimate (by chance, when the interaction is small) counts as 0.
    cov = np.cov(boot)
    test_var = max(float(cov.sum() - np.trace(cov)) / (n * (n - 1)), 0.0)
    se2 = seed_var + test_var
    df = float(_degrees_of_freedom(seed_var, test_var, n))
    half = t_quantile(df, level) * math.sqrt(se2)
    diff = float(d.mean())
    return Interval(diff, diff - half, diff + half, KIND_EXAMPLES, n, level, float(df))


def paired_bootstrap(a: Runs, b: Runs, score: ScoreFn, replicates: int = 2000, seed: int = 0, level: float = 0.95,
                     shared_examples: bool = False) -> Interval:
    """The former name of :func:`paired_interval` (which no longer resamples the seeds)."""
    return paired_interval(a, b, score, replicates=replicates, seed=seed, level=level,
                           shared_examples=shared_examples)
