import json
from pathlib import Path

import pytest

from ftn.apps.cli import main


def test_params_resnet34_json(capsys):
    assert main(["params", "--backbone", "resnet34", "--rank", "40", "--tasks", "6", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["per_task_delta"] == 656_280
    assert report["backbone"] == 21_284_672
    assert report["paper_total"] == 25_222_352


def test_params_text_reports_caps(capsys):
    assert main(["params", "--backbone", "mobilenet_v2", "--rank", "40"]) == 0
    out = capsys.readouterr().out
    assert "paper convention" in out and "rank cap [task1] features.1.conv.0.0" in out


def test_unknown_backbone_is_a_clear_error(capsys):
    assert main(["params", "--backbone", "resnet35"]) == 2
    assert "unknown backbone 'resnet35'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- help without torch
HELP_PROBE = r"""
import json, runpy, sys
seen = {}
def probe(label, run):
    try:
        run()
    except SystemExit:
        pass
    seen[label] = "torch" in sys.modules
probe("python -m ftn --help", lambda: (setattr(sys, "argv", ["ftn", "--help"]), runpy.run_module("ftn", run_name="__main__")))
from ftn.apps.cli import main
probe("ftn --version", lambda: main(["--version"]))
for command in ("params", "train", "eval", "sweep", "predict", "serve"):
    probe(f"ftn {command} --help", lambda: main([command, "--help"]))
import ftn
probe("import ftn", lambda: ftn.__version__)
print(json.dumps(seen))
"""


def test_help_and_version_answer_without_importing_torch():
    """`ftn --help`, each command's help (but demo's, whose flags come from the settings) and
    `import ftn` import no torch: seconds saved per call on a loaded machine."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", HELP_PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(seen) == 9 and not any(seen.values()), seen


def test_lazy_package_exports_work_as_before():
    import ftn
    from ftn import FTNModel, TaskError
    from ftn.core.errors import TaskError as core_task_error
    from ftn.core.model import FTNModel as core_model

    assert FTNModel is core_model and TaskError is core_task_error and ftn.FTNModel is core_model
    assert set(ftn.__all__) <= set(dir(ftn))
    namespace: dict = {}
    exec("from ftn import *", namespace)
    assert {n for n in ftn.__all__} <= set(namespace)
    import pytest

    with pytest.raises(ImportError, match="SingleTaskView"):
        exec("from ftn import TaskModel", {})
    with pytest.raises(AttributeError, match="no_such_name"):
        ftn.no_such_name  # noqa: B018


# ----------------------------------------------------------------------------- ftn predict
def test_predict_labels_an_image_once_when_named_directly_and_through_its_folder(tmp_path, capsys):
    from helpers.serving import SERVER_ARGS, make_adapters, png_bytes

    adapters = make_adapters(tmp_path / "adapters", ["a"])
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        (images / f"{i}.png").write_bytes(png_bytes(i))
    alias = tmp_path / "alias"
    alias.symlink_to(images)  # the same folder under another name
    assert main(["predict", *SERVER_ARGS, "--adapter", str(adapters["a"]), str(images / "1.png"), str(images),
                 str(alias / "0.png"), str(images / ".." / "images" / "1.png"), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == [str(images / "1.png"), str(images / "0.png")]


# ----------------------------------------------------------------------------- ftn demo's folder
def _fake_demo(monkeypatch):
    import ftn.settings.classification.demo as demo

    calls = []

    def fake_run_demo(output, quick, methods=(), progress=True, extra=()):
        calls.append((str(output), quick))
        return {"wall_seconds": 0.0, "quick": quick, "methods": {}}

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    monkeypatch.setattr(demo, "format_table", lambda results: "| table |")
    return calls


def test_quick_demo_writes_to_its_own_folder_and_says_it_is_a_smoke_test(monkeypatch, tmp_path, capsys):
    calls = _fake_demo(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick"]) == 0
    assert main(["demo"]) == 0
    assert calls == [("outputs/demo-quick", True), ("outputs/demo", False)]
    printed = capsys.readouterr().out
    assert printed.count("smoke test") == 2 and printed.count("| table |") == 2


def test_a_run_never_replaces_a_different_run_without_overwrite(monkeypatch, tmp_path, capsys):
    calls = _fake_demo(monkeypatch)
    full = tmp_path / "full"
    full.mkdir()
    (full / "results.json").write_text(json.dumps({"quick": False, "methods": {}}))  # a full run of before
    assert main(["demo", "--quick", "--output", str(full)]) == 2
    assert "holds a full run" in capsys.readouterr().err and calls == []
    assert main(["demo", "--output", str(full)]) == 0  # the same kind of run: rerun in place
    assert main(["demo", "--dense", "--output", str(full)]) == 2  # another demo
    assert "of the classification demo" in capsys.readouterr().err
    (tmp_path / "trained").mkdir()
    (tmp_path / "trained" / "results.json").write_text("{}")  # ftn train's folder: not a demo
    assert main(["demo", "--output", str(tmp_path / "trained")]) == 2
    assert main(["demo", "--quick", "--output", str(full), "--overwrite"]) == 0
    assert calls == [(str(full), False), (str(full), True)]
    assert json.loads((full / ".ftn-demo.json").read_text()) == {"setting": "classification", "quick": True}


# ----------------------------------------------------------------------------- demo → predict → serve
def _printed_commands(printed: str) -> dict[str, list[str]]:
    import shlex

    return {tokens[1]: tokens for line in printed.splitlines()
            if (tokens := shlex.split(line.strip()) if line.strip().startswith("ftn ") else None)}


@pytest.mark.slow
def test_the_demo_ends_with_predict_and_serve_commands_that_work(tmp_path, capsys):
    """A short `ftn demo --quick` (FTN only, two steps a task): its last lines name its adapters
    and give `ftn predict` / `ftn serve` commands; the predict command, run as printed, labels the
    sample images with the task's class names, and the serve command's service loads every task."""
    from ftn.apps.cli import build_parser
    from ftn.apps.serving.server import build_service

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(out), "--no-progress", "--methods", "ftn", "train.max_steps=2",
                 "data.test_limit=32", "data.val_limit=32"]) == 0
    printed = capsys.readouterr().out
    last = printed.strip().splitlines()[-5:]  # adapters, a heading, predict, serve, curl
    assert last[0].startswith("Adapters") and last[0].endswith(str(out / "ftn" / "adapters"))
    commands = _printed_commands(printed)
    assert set(commands) == {"predict", "serve"}

    assert main(commands["predict"][1:] + ["--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    samples = sorted((out / "samples" / "fashion").iterdir())
    assert [r["image"] for r in results] == [str(p) for p in samples] and len(samples) == 3
    fashion = {"t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"}
    assert all(r["task"] == "fashion" and {p["label"] for p in r["top_k"]} <= fashion for r in results)

    args = build_parser().parse_args(commands["serve"][1:])  # serving itself: tests/apps/serving
    service = build_service(args)
    service.load_folder()
    assert set(service.catalog) == {"mnist", "fashion", "animal", "optdigits"} and not service.skipped


@pytest.mark.slow
def test_dense_demo_prints_its_table_once_and_its_predict_command_works(tmp_path, capsys, monkeypatch):
    import functools

    import ftn.settings.dense.demo as dense

    # The real demo on fewer scenes (`--quick` renders 64 + 16).
    monkeypatch.setattr(dense, "run_dense_demo", functools.partial(dense.run_dense_demo, workers=1, n_train=8,
                                                                    n_val=2))
    out = tmp_path / "dense"
    assert main(["demo", "--dense", "--quick", "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("| method |") == 1
    predict = _printed_commands(printed)["predict"]
    assert main(predict[1:] + ["--output-dir", str(tmp_path / "predicted"), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 2 * len(list((out / "ftn" / "adapters").glob("*.safetensors")))
    assert all(Path(r["output"]).is_file() for r in results)
