"""`benchmarks/loadtest_scale.py --quick`: the load test at scale runs end to end (a folder of
generated adapters, more tasks than may be resident, one `ftn serve --max-resident` process and,
with the ray extra, `ftn serve --ray --replicas 2`) and its output carries the figures and passing
correctness checks; plus the helpers it reads servers with."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from ftn.apps.serving.loadtest import histogram_quantile, read_metrics

from helpers import REPO

SCRIPT = REPO / "benchmarks" / "loadtest_scale.py"
PHASE_KEYS = {"pattern", "requests", "errors", "throughput_rps", "p50_ms", "p99_ms", "hit_rate", "cold_loads",
              "evictions", "cold_load_mean_ms", "cold_load_p50_ms", "cold_load_p99_ms", "resident_max",
              "memory_mib", "load_avg"}


def _script():
    spec = importlib.util.spec_from_file_location("loadtest_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One --quick run (48 tasks, at most 8 resident); Ray too when its extra is installed."""
    out = tmp_path_factory.mktemp("loadtest") / "out.json"
    with_ray = importlib.util.find_spec("ray") is not None
    cmd = [sys.executable, str(SCRIPT), "--quick", "--duration", "1.5", "--json", str(out)]
    proc = subprocess.run(cmd + ([] if with_ray else ["--no-ray"]), capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    return proc, json.loads(out.read_text()) if out.exists() else None, with_ray


@pytest.mark.slow  # starts server processes (and a local Ray)
def test_quick_run_passes_its_checks_and_reports_the_figures(quick_run):
    proc, results, with_ray = quick_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert results is not None and results["tasks"] == 48 and results["max_resident"] == 8
    assert "deployment" in proc.stdout and "checks:" in proc.stdout and "FAIL" not in proc.stdout
    names = {c["name"] for c in results["checks"]}
    assert "answers equal ftn predict's on the sample" in names and all(c["ok"] for c in results["checks"])
    answers = results["answers"]
    assert answers["answers_checked"] > 0 and answers["mismatched"] == 0 and answers["sample_tasks"] == 8
    deployments = ["single", "ray"] if with_ray else ["single"]
    for key in deployments:
        dep = results[key]
        assert [p["pattern"] for p in dep["phases"]] == ["resident only", "uniform #1", "zipf s=1.1 #1"]
        for p in dep["phases"]:
            assert PHASE_KEYS <= set(p) and p["errors"] == 0 and p["requests"] > 0 and p["throughput_rps"] > 0
            assert 0 <= p["hit_rate"] <= 1 and p["resident_max"] <= 8
        warm, uniform, zipf = dep["phases"]
        assert warm["cold_loads"] == 0 and warm["hit_rate"] == 1.0  # the resident tasks only: no loads
        assert uniform["cold_loads"] > 0 and uniform["evictions"] > 0 and uniform["cold_load_mean_ms"] > 0
        assert uniform["hit_rate"] < 1 and zipf["cold_loads"] > 0
        assert dep["probe"]["tasks"] == 4 and dep["probe"]["errors"] == 0 and dep["probe"]["cold_p50_ms"] > 0 and dep["probe"]["warm_p50_ms"] > 0
        assert dep["stop"]["processes_left_killed"] == 0
    single = results["single"]
    assert single["resident_at_start"] == [8] and single["rss_per_resident_task_mib"] is not None
    assert set(single["phases"][0]["memory_mib"]) == {"server"}
    if with_ray:
        assert results["ray"]["resident_at_start"] == [8, 8]  # two replicas, each filled to K
        assert {"replica0", "replica1"} <= set(results["ray"]["phases"][0]["memory_mib"])


def test_histogram_quantile_interpolates_in_the_bucket_as_prometheus_does():
    buckets = [(0.1, 0.0), (0.2, 10.0), (0.5, 20.0), (float("inf"), 20.0)]
    assert histogram_quantile(buckets, 0.5) == pytest.approx(0.2)  # rank 10: the top of (0.1, 0.2]
    assert histogram_quantile(buckets, 0.25) == pytest.approx(0.15)
    assert histogram_quantile(buckets, 0.75) == pytest.approx(0.35)
    assert histogram_quantile([(1.0, 0.0), (float("inf"), 3.0)], 0.5) == 1.0  # beyond the last bound
    assert math.isnan(histogram_quantile([(1.0, 0.0), (float("inf"), 0.0)], 0.5))


def test_read_metrics_sums_what_a_server_reports():
    text = ('# TYPE ftn_adapter_loads counter\nftn_adapter_loads_total{reason="request"} 7.0\n'
            'ftn_adapter_loads_total{reason="start"} 64.0\n'
            '# TYPE ftn_adapter_cold_load_seconds histogram\n'
            'ftn_adapter_cold_load_seconds_bucket{le="0.5"} 3.0\nftn_adapter_cold_load_seconds_bucket{le="+Inf"} 7.0\n'
            'ftn_adapter_cold_load_seconds_count 7.0\nftn_adapter_cold_load_seconds_sum 2.5\n')
    m = read_metrics(text)
    assert ({"reason": "request"}, 7.0) in m["ftn_adapter_loads_total"]
    assert m["ftn_adapter_cold_load_seconds_sum"] == [({}, 2.5)]
    assert [v for labels, v in m["ftn_adapter_cold_load_seconds_bucket"] if labels["le"] == "+Inf"] == [7.0]


def _args(**overrides):
    import argparse

    return argparse.Namespace(**{"rss_slack_mib": 48.0, "rss_mib_per_load": 0.05, **overrides})


def _phase(pattern, loads, rss, errors=0, resident=8):
    return {"pattern": pattern, "requests": 100, "errors": errors, "cold_loads": loads, "evictions": loads,
            "resident_max": resident, "memory_mib": {"server": rss}}


def test_churn_checks_fail_on_errors_growth_per_load_and_too_many_resident():
    churn_checks = _script().churn_checks
    probe = {"tasks": 4, "errors": 0}
    good = {"phases": [_phase("resident only", 0, 700), _phase("uniform #1", 500, 800), _phase("zipf #1", 300, 810)],
            "probe": probe}
    assert all(ok for _, ok, _ in churn_checks("single", good, 1000, 64, _args()))
    # A task's 1.1 MiB left behind at each of 300 loads: beyond 48 MiB + 0.05 MiB x 300.
    leaking = {"phases": [_phase("resident only", 0, 700), _phase("uniform #1", 500, 800),
                          _phase("zipf #1", 300, 800 + 1.1 * 300)], "probe": probe}
    failed = {name for name, ok, _ in churn_checks("single", leaking, 1000, 64, _args()) if not ok}
    assert failed == {"single: no RSS growth per load"}
    broken = {"phases": [_phase("resident only", 0, 700), _phase("uniform #1", 0, 700, errors=3, resident=65)],
              "probe": probe}
    failed = {name for name, ok, _ in churn_checks("single", broken, 1000, 64, _args()) if not ok}
    assert failed == {"single: every response 200", "single: cold loads > 0", "single: evictions > 0 (tasks > K)",
                      "single: resident <= K per replica"}
    assert all(ok for name, ok, _ in churn_checks("single", broken, 64, 64, _args()) if "evictions" in name)
    probe_failed = {**good, "probe": {"tasks": 4, "errors": 1}}
    failed = {name for name, ok, _ in churn_checks("single", probe_failed, 1000, 64, _args()) if not ok}
    assert failed == {"single: every response 200"}
