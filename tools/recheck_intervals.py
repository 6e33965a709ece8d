"""Re-check the paired comparisons of committed sweep results (``docs/sweeps/*/results.json``)
with a t-interval over seeds, from the per-seed scores the results keep.

Older sweeps took their intervals from a bootstrap that resampled the seeds, which with 3 seeds
behaves like a sign test and calls about 15-18 % of null comparisons significant at a nominal
5 % (``docs/sweep.md``). Their per-example test statistics stayed in the run folders, not in the
repository, so the calibrated interval (``ftn.training.stats.paired_interval``: the seed spread
plus the test set's shared share) cannot be recomputed from the repository alone. The t-interval
over seeds is its seed part; it does not see the test-example share, and its degrees of freedom
are the smallest the full interval can have. A comparison it does not support is withdrawn; one
it supports is a candidate that a regenerated sweep must confirm.

    python tools/recheck_intervals.py [docs/sweeps/NAME ...]      # a Markdown table per sweep
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ftn.training.stats import paired_t_interval

ROOT = Path(__file__).resolve().parents[1]


def _label(method: str, point: str) -> str:
    return method if point == "default" else f"{method} [{point}]"


def recheck(path: Path) -> list[str]:
    results = json.loads((path / "results.json").read_text())
    groups = {(g["method"], g["grid_point"]): g for g in results["groups"]}
    lines = [f"### {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", "",
             "| reference | method | difference | published interval | t over seeds | still significant? |",
             "|---|---|---|---|---|---|"]
    checks = [("score", c, lambda g: g["scores"]) for c in results["comparisons"]]
    if results.get("gain"):
        checks += [("Δm", c, lambda g: g["gain"]["by_seed"]) for c in results["gain"]["comparisons"]]
    for what, c, values in checks:
        a = values(groups[(c["reference"], c["reference_point"])])
        b = values(groups[(c["method"], c["grid_point"])])
        seeds = [s for s in a if s in b]
        t = paired_t_interval([a[s] for s in seeds], [b[s] for s in seeds])
        published = f"[{c['low']:+.2f}, {c['high']:+.2f}]{' *' if c['significant'] else ''}"
        verdict = ("no" if c["significant"] and not t.significant else
                   "yes, by t over seeds (to be confirmed)" if c["significant"] else "—")
        lines.append(f"| {_label(c['reference'], c['reference_point'])} | {_label(c['method'], c['grid_point'])} "
                     f"({what}) | {c['diff']:+.2f} | {published} | [{t.low:+.2f}, {t.high:+.2f}]"
                     f"{' *' if t.significant else ''} | {verdict} |")
    return lines + [""]


def main(argv: list[str]) -> int:
    paths = [Path(p) for p in argv] or sorted(p.parent for p in (ROOT / "docs" / "sweeps").glob("*/results.json"))
    for path in paths:
        print("\n".join(recheck(path.resolve())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
