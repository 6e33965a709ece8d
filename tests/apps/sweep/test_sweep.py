"""`ftn sweep`: the protocol (LR chosen on validation with the first seed, the other seeds at that
rate, the test split scored once per chosen run), resume, the tidy results, the plot, the
statistics and the errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from ftn.apps.cli import main
from ftn.core.errors import ConfigError
from ftn.training.config import apply_overrides, load_config, new_config
from ftn.training.runner import evaluate_tasks
from ftn.training.setting import Classify
from ftn.training.stats import mean_std, paired_bootstrap, paired_t_interval
from ftn.apps.sweep import SweepSpec, choose_lr, lr_grids, pareto_front, parse_axis, run_sweep

TINY = ["model.backbone=tiny_convnet", "model.pretrained=false", "data.image_size=16", "data.domains=[mnist,fashion]"]


def _sweep(out: Path, *extra: str) -> int:
    return main(["sweep", "--demo", "multidomain", "--quick", "--methods", "ftn", "full", "--seeds", "0", "1",
                 "--lr-extend", "0", "--output", str(out), "--no-progress", *extra, *TINY])


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_quick_sweep_protocol_rows_resume_and_plot(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert _sweep(out) == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    # 2 methods × (3 rates on seed 0 + seed 1 at the chosen rate): one row per run.
    assert len(rows) == 8
    with (out / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 8
    for method in ("ftn", "full"):
        mine = [r for r in rows if r["method"] == method]
        search = [r for r in mine if r["seed"] == 0]
        assert len(search) == 3 and len({r["lr"] for r in search}) == 3
        best = max(search, key=lambda r: r["val_score"])
        assert best["chosen"] and [r["lr"] for r in search if r["chosen"]] == [best["lr"]]  # ties: first rate
        other = [r for r in mine if r["seed"] == 1]
        assert len(other) == 1 and other[0]["lr"] == best["lr"] and other[0]["chosen"]
        # Test metrics only for the chosen runs; the search runs never scored their test split.
        for r in mine:
            assert (r["test_score"] is not None) == r["chosen"]
            assert any(k.startswith("test/") for k in r) == r["chosen"]
            task = json.loads((Path(r["output"]) / "results.json").read_text())["tasks"]["mnist"]
            assert task["test"] is None and task["val_score"] is not None
    # The chosen run's test score from its saved tasks equals what `ftn eval` computes.
    chosen = next(r for r in rows if r["method"] == "ftn" and r["chosen"] and r["seed"] == 0)
    cfg = load_config(Path(chosen["output"]) / "config.json")  # JSON is YAML
    files = [Path(chosen["output"]) / "adapters" / f"{t}.safetensors" for t in ("mnist", "fashion")]
    assert evaluate_tasks(cfg, files)["mnist"]["acc"] == pytest.approx(chosen["test/mnist/acc"])
    stats = np.load(Path(chosen["output"]) / "test_examples.npz")
    assert stats["mnist"].shape == (32, 2)
    assert results["comparisons"][0]["kind"] == "t over seeds + test examples"
    assert (out / "accuracy_vs_parameters.png").stat().st_size > 1000
    table = (out / "table.md").read_text()
    assert table.startswith("Regenerate: `ftn sweep --demo multidomain --quick") and "| ftn | full |" in table
    # Per-task table: each domain's test accuracy, mean ± std over the seeds of the chosen runs.
    ftn_group = next(g for g in results["groups"] if g["method"] == "ftn")
    accs = [r["test/mnist/acc"] for r in rows if r["method"] == "ftn" and r["chosen"]]
    assert ftn_group["per_task_metrics"]["mnist"]["acc"][0] == pytest.approx(np.mean(accs))
    assert "| method | grid point | mnist | fashion |" in table
    # Finished runs keep adapters, logs and results; their checkpoints (only resuming reads them) go.
    assert not list(out.rglob("checkpoint.pt*"))
    assert len(list(out.rglob("adapters/*.safetensors"))) == 8 * 2
    assert len(list(out.rglob("log.csv"))) == 8 * 2
    # Resume: the same command trains nothing again.
    import ftn.training.runner as runner

    calls = []
    original = runner.run_experiment
    runner.run_experiment = lambda cfg, *a, **k: calls.append(cfg) or original(cfg, *a, **k)
    try:
        assert _sweep(out) == 0
        assert calls == []
        # Where the runs train is not part of the experiment: a sweep begun on a GPU is finished
        # on the CPU with its runs reused.
        assert _sweep(out, "train.device=cpu") == 0
        assert calls == []
        # A sweep folder moved elsewhere resumes too (its runs' output_dir is the old place).
        import shutil

        moved = tmp_path / "moved"
        shutil.copytree(out, moved)
        assert _sweep(moved) == 0
        assert calls == []
        # A lost results file (a run interrupted after training) is re-run; the others are skipped.
        Path(rows[0]["output"], "results.json").unlink()
        assert _sweep(out) == 0
        assert [c.output_dir for c in calls] == [rows[0]["output"]]
    finally:
        runner.run_experiment = original
    # Another config in the same folder is refused rather than mixed in.
    capsys.readouterr()
    assert main(["sweep", "--demo", "multidomain", "--quick", "--methods", "ftn", "full", "--seeds", "0", "1",
                 "--lr-extend", "0", "--output", str(out), "--no-progress", *TINY, "train.weight_decay=0.5"]) == 2
    assert "another config" in capsys.readouterr().err


@pytest.mark.slow
def test_grid_axis_for_one_method_and_forced_lr_choice(tmp_path):
    out = tmp_path / "grid"
    bases = {}

    def base(method):
        return apply_overrides(new_config("classification"), [
            f"method.name={method}", "train.max_steps=1", "train.epochs=1", "data.train_limit=16",
            "data.val_limit=8", "data.test_limit=8", "data.batch_size=8", "train.recalibrate_batches=1", *TINY])

    spec = SweepSpec(base=lambda m: bases.setdefault(m, base(m)), methods=["ftn", "linear"], output=out,
                     axes=[parse_axis("ftn:method.ftn.rank=1,2")], seeds=[0],
                     lr_grid={"ftn": [1e-3, 1e-2], "linear": [1e-3, 1e-2]}, lr_extend=0, progress=False)
    # Force the choice: a fake validation score that prefers the larger rate for ftn.
    import ftn.apps.sweep.report as report

    real = report._val_score
    report._val_score = lambda run: 1.0 if run.lr == 1e-2 else 0.0
    try:
        results = run_sweep(spec)
    finally:
        report._val_score = real
    groups = {(g["method"], g["grid_point"]): g for g in results["groups"]}
    assert set(groups) == {("ftn", "method.ftn.rank=1"), ("ftn", "method.ftn.rank=2"), ("linear", "default")}
    assert all(g["lr"] == 1e-2 for g in groups.values())
    assert groups[("ftn", "method.ftn.rank=1")]["stored_params"] < groups[("ftn", "method.ftn.rank=2")]["stored_params"]
    assert len(results["rows"]) == 6 and len(results["trained"]) == 6
    assert {(c["reference_point"], c["method"]) for c in results["comparisons"]} == {
        ("method.ftn.rank=1", "linear"), ("method.ftn.rank=2", "linear")}
    assert (out / "runs" / "ftn" / "method.ftn.rank=2" / "lr0.01" / "seed0" / "test.json").is_file()

    # --compare-axis: grid points of one method that differ only in that axis, first value first.
    spec.compare_axis = "method.ftn.rank"
    report._val_score = lambda run: 1.0 if run.lr == 1e-2 else 0.0
    try:
        again = run_sweep(spec)
    finally:
        report._val_score = real
    assert again["trained"] == []  # everything was there already
    within = [c for c in again["comparisons"] if c["method"] == "ftn"]
    assert [(c["reference_point"], c["grid_point"]) for c in within] == [("method.ftn.rank=1", "method.ftn.rank=2")]
    spec.compare_axis = "method.ftn.init"
    with pytest.raises(ConfigError, match="not a --grid axis"):
        run_sweep(spec)


def _tiny_base(method):
    return apply_overrides(new_config("classification"), [
        f"method.name={method}", "train.max_steps=1", "train.epochs=1", "data.train_limit=16",
        "data.val_limit=8", "data.test_limit=8", "data.batch_size=8", "train.recalibrate_batches=1", *TINY])


@pytest.mark.slow
def test_an_edge_choice_extends_the_lr_grid_until_interior_or_the_limit(tmp_path, monkeypatch):
    """The chosen rate at the top of the grid adds a rate above (the grid's ratio), and again
    while the choice stays there, up to --lr-extend; an interior choice stops it."""
    import ftn.apps.sweep.report as report

    bases = {}
    spec = SweepSpec(base=lambda m: bases.setdefault(m, _tiny_base(m)), methods=["linear", "norm_head"],
                     output=tmp_path / "ext", seeds=[0], lr_factors=(0.5, 1.0, 2.0), lr_extend=2, progress=False)
    peak = {"linear": 1e9, "norm_head": 0.004}  # linear: better the higher; norm_head: best at 0.004
    monkeypatch.setattr(report, "_val_score", lambda run: -abs(np.log(run.lr / peak[run.method])))
    results = run_sweep(spec)
    groups = {g["method"]: g for g in results["groups"]}
    # linear: base 1e-3 → 5e-4, 1e-3, 2e-3; extended twice upwards, still at the edge
    assert groups["linear"]["lr_extended"] == [0.004, 0.008] and groups["linear"]["lr"] == 0.008
    assert groups["linear"]["lr_at_edge"] is True
    # norm_head: 5e-4, 1e-3, 2e-3 (edge) → 4e-3 (chosen, edge) → 8e-3: 4e-3 is interior
    assert groups["norm_head"]["lr_extended"] == [0.004, 0.008] and groups["norm_head"]["lr"] == 0.004
    assert groups["norm_head"]["lr_at_edge"] is False
    assert list(groups["norm_head"]["lr_grid"]) == ["0.0005", "0.001", "0.002", "0.004", "0.008"]
    extension_rows = [r for r in results["rows"] if r["lr_extension"]]
    assert len(extension_rows) == 4
    table = (tmp_path / "ext" / "table.md").read_text()
    assert "0.008 (edge)" in table and "+0.008" in table


@pytest.mark.slow
def test_tune_axis_is_chosen_on_validation_with_the_lr_and_reported_per_value(tmp_path, monkeypatch):
    """--tune taps:method.taps.penalty=...: every (λ, rate) pair trained with the first seed, the
    best on validation chosen, the other seeds at that pair; per λ the layers on and parameters."""
    import ftn.apps.sweep.report as report

    bases = {}
    spec = SweepSpec(base=lambda m: bases.setdefault(m, _tiny_base(m)), methods=["taps"], output=tmp_path / "tune",
                     seeds=[0, 1], lr_grid={"taps": [1e-3, 2e-3]}, lr_extend=0,
                     tune=[parse_axis("taps:method.taps.penalty=0,30")], progress=False)
    monkeypatch.setattr(report, "_val_score",
                        lambda run: (1.0 if dict(run.tuned)["method.taps.penalty"] == "30" else 0.0) + run.lr)
    results = run_sweep(spec)
    (g,) = results["groups"]
    assert g["tuned"] == {"method.taps.penalty": "30"} and g["lr"] == 2e-3
    seeds = [r for r in results["rows"] if r["chosen"]]
    assert {r["seed"] for r in seeds} == {0, 1} and {r["method.taps.penalty"] for r in seeds} == {"30"}
    assert len(results["rows"]) == 5  # 2 λ × 2 rates on seed 0, seed 1 at the chosen pair
    per = {t["tuned"]["method.taps.penalty"]: t for t in g["tuning"]}
    assert set(per) == {"0", "30"} and per["30"]["chosen"] and not per["0"]["chosen"]
    assert per["0"]["layers_on"] == [per["0"]["gated_layers"][0]] * 2  # λ = 0: every gate open
    assert per["30"]["stored_params"] <= per["0"]["stored_params"]
    assert (tmp_path / "tune" / "runs" / "taps" / "default" / "method.taps.penalty=30" / "lr0.002" / "seed1").is_dir()
    table = (tmp_path / "tune" / "table.md").read_text()
    assert "Tuned on validation" in table and "penalty=30 (chosen)" in table


# ----------------------------------------------------------------------------- pieces
def test_choose_lr_takes_the_best_validation_score_first_on_ties():
    assert choose_lr([(1e-3, 50.0), (3e-3, 70.0), (1e-2, 60.0)]) == 3e-3
    assert choose_lr([(1e-3, 70.0), (3e-3, 70.0)]) == 1e-3
    assert choose_lr([(1e-3, None)]) == 1e-3  # one rate: nothing to choose
    with pytest.raises(ConfigError, match="validation split"):
        choose_lr([(1e-3, None), (3e-3, None)])


def test_lr_grids_are_centred_on_each_method_and_the_same_size():
    grids = lr_grids(["ftn", "full"], {"ftn": 3e-3, "full": 5e-4})
    assert grids == {"ftn": [0.0015, 0.003, 0.006], "full": [0.00025, 0.0005, 0.001]}
    assert lr_grids(["ftn", "full"], {"ftn": 3e-3, "full": 5e-4}, {"full": [1e-4, 2e-4, 4e-4]})["full"] == [1e-4, 2e-4, 4e-4]
    with pytest.raises(ConfigError, match="same number"):
        lr_grids(["ftn", "full"], {"ftn": 3e-3, "full": 5e-4}, {"full": [1e-4]})
    with pytest.raises(ConfigError, match="not in --methods"):
        lr_grids(["ftn"], {"ftn": 3e-3}, {"lora": [1e-4, 1e-3]})


def test_parse_axis_forms():
    assert parse_axis("method.ftn.rank=1,2,4") == parse_axis(" method.ftn.rank = 1,2,4".replace(" = ", "="))
    a = parse_axis("ftn,lora:method.ftn.rank=1,2")
    assert a.methods == ("ftn", "lora") and a.values == ("1", "2") and a.applies("lora") and not a.applies("full")
    assert parse_axis("data.crop=[48,48],[64,64]").values == ("[48,48]", "[64,64]")
    for bad, match in [("method.ftn.rank", "form"), ("train.lr=1,2", "--lr-grid"), ("seed=1,2", "--seeds"),
                       ("method.ftn.rank=1,1", "repeated")]:
        with pytest.raises(ConfigError, match=match):
            parse_axis(bad)


@pytest.mark.parametrize("args, message", [
    (["--methods", "ftn", "fulll"], "did you mean 'full'"),
    (["--grid", "ftn:method.rank=1,2"], "method.ftn.rank"),
    (["--grid", "lora:method.ftn.rank=1,2"], "'lora' is not in --methods"),
    (["--grid", "train.bogus=1,2"], "unknown config key 'train.bogus'"),
])
def test_errors_name_the_problem(tmp_path, capsys, args, message):
    assert main(["sweep", "--demo", "multidomain", "--quick", "--methods", "ftn", "full", "--output",
                 str(tmp_path), *args, *TINY]) == 2
    assert message in capsys.readouterr().err


def test_pareto_front():
    assert pareto_front([(1, 50), (2, 40), (3, 60), (3, 55), (10, 60), (20, 70)]) == [(1, 50), (3, 60), (20, 70)]


# ----------------------------------------------------------------------------- statistics
def _runs(p: float, seeds: int, n: int, rng) -> list[dict[str, np.ndarray]]:
    out = []
    for _ in range(seeds):
        correct = (rng.random(n) < p).astype(float)
        out.append({"t": np.stack([correct, np.ones(n)], 1)})
    return out


def _acc(task, total):
    return Classify(2).metrics_from_stats(total)["acc"]


def test_classify_example_stats_sum_to_its_metrics():
    import torch

    obj = Classify(3)
    x = torch.randn(20, 3)
    y = torch.randint(0, 3, (20,))
    batches = [(x[:7], y[:7]), (x[7:], y[7:])]
    stats = obj.example_stats(lambda t: t, batches)
    assert stats.shape == (20, 2)
    assert obj.metrics_from_stats(stats.sum(0)) == pytest.approx(obj.metrics(lambda t: t, batches))


def test_bootstrap_interval_covers_the_truth_and_flags_only_real_differences():
    rng = np.random.default_rng(0)
    a, b = _runs(0.80, 3, 2000, rng), _runs(0.70, 3, 2000, rng)
    clear = paired_bootstrap(a, b, _acc, replicates=500)
    assert clear.significant and clear.low < 10.0 < clear.high  # the true difference is 10 points
    same = paired_bootstrap(a, a, _acc, replicates=200)
    assert not same.significant and same.diff == 0.0
    # Two methods of equal true accuracy: mostly not significant (5 % false positives allowed).
    hits = [paired_bootstrap(_runs(0.75, 3, 500, rng), _runs(0.75, 3, 500, rng), _acc, replicates=300, seed=i)
            .significant for i in range(20)]
    assert sum(hits) <= 3


def test_bootstrap_is_paired_over_examples():
    # b is a with 2 % of the examples flipped to wrong: a tiny but consistent difference that only
    # a paired resampling (the same examples for both) can resolve.
    rng = np.random.default_rng(1)
    a = _runs(0.7, 2, 5000, rng)
    b = []
    for run in a:
        s = run["t"].copy()
        flip = np.flatnonzero(s[:, 0] == 1)[:70]
        s[flip, 0] = 0
        b.append({"t": s})
    assert paired_bootstrap(a, b, _acc, replicates=300).significant


def test_t_interval_over_seeds_and_mean_std():
    iv = paired_t_interval([80.0, 81.0, 82.0], [70.0, 70.5, 71.5])
    assert iv.kind == "t over seeds" and iv.significant and iv.low < iv.diff < iv.high
    assert not paired_t_interval([80.0, 70.0, 75.0], [75.0, 74.0, 76.0]).significant
    assert paired_t_interval([80.0], [70.0]).low is None
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5), 2)


def test_a_key_added_to_the_schema_later_does_not_make_an_old_run_another_config():
    """Resuming a sweep after the schema grew a key (at its default) must reuse the old runs;
    a real difference, or the new key away from its default, still counts."""
    from ftn.apps.sweep.run import _diff

    old = {"method": {"name": "ftn", "ftn": {"rank": 8}}, "train": {"lr": 0.1}}
    default = {"method": {"name": "ftn", "ftn": {"rank": 8}, "budget": None}, "train": {"lr": 0.001}}
    assert _diff(old, {"method": {"name": "ftn", "ftn": {"rank": 8}, "budget": None}, "train": {"lr": 0.1}},
                 default) == []
    assert _diff(old, {"method": {"name": "ftn", "ftn": {"rank": 8}, "budget": 0.01}, "train": {"lr": 0.1}},
                 default) == ["method.budget"]
    assert _diff(old, {"method": {"name": "ftn", "ftn": {"rank": 4}}, "train": {"lr": 0.1}}, default) == \
        ["method.ftn.rank"]


def test_taps_starts_from_full_fine_tunings_rate_in_every_demo(tmp_path, monkeypatch):
    """TAPS learns a full-size δW per layer, so its LR grid is centred on full fine-tuning's rate
    (a rate made for rank-8 factors diverges on a transformer's dense updates)."""
    import ftn.apps.sweep.sources as sources
    import ftn.settings.dense as dense

    monkeypatch.setattr(dense, "prepare_sweep_scenes", lambda output, quick: output)
    for demo in ("multidomain", "dense", "text"):
        base = sources.demo_base(demo, tmp_path / demo, True, [])
        assert base("taps").train.lr == base("full").train.lr != base("ftn").train.lr, demo
        assert base("taps").method.name == "taps"


def test_bootstrap_with_shared_examples_resamples_the_tasks_together():
    """Dense tasks are scored on the same images: one resample serves every task. Two tasks
    with identical statistics then give exactly the one-task interval; resampled apart, the
    mean over the two tasks averages two draws and the interval narrows. (A method's two seeds
    agree on most examples, as real runs do: what they share is the test-example component
    that the resample measures.)"""
    rng = np.random.default_rng(0)
    n = 60

    def runs(p: float) -> list[dict[str, np.ndarray]]:
        base = rng.random(n) < p
        return [{"x": np.stack([base ^ (rng.random(n) < 0.05), np.ones(n)], 1).astype(float)} for _ in range(2)]

    a, b = runs(0.7), runs(0.6)
    twice = lambda runs: [{"x": r["x"], "y": r["x"]} for r in runs]  # noqa: E731
    score = lambda task, total: 100 * total[0] / total[1]  # noqa: E731
    one = paired_bootstrap(a, b, score, replicates=400)
    shared = paired_bootstrap(twice(a), twice(b), score, replicates=400, shared_examples=True)
    apart = paired_bootstrap(twice(a), twice(b), score, replicates=400)
    assert (shared.low, shared.high) == (one.low, one.high) and shared.diff == one.diff
    assert apart.high - apart.low < shared.high - shared.low
    with pytest.raises(ValueError, match="same number of examples"):
        paired_bootstrap([{"x": a[0]["x"], "y": a[0]["x"][:10]}], [{"x": b[0]["x"], "y": b[0]["x"][:10]}], score,
                         shared_examples=True)
