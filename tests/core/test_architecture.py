"""The core's shape: one direction of imports, each module importable on its own, and a working
``import ftn`` with nothing but torch and safetensors (the harness's libraries blocked)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# The core, lowest first: a module may import only modules to its left. errors and cp are
# leaves; adapters, allocation, report, merge, norms and recompute work on a model through its
# public methods and are imported by it.
CORE = ["version"] + ["core." + m for m in [
    "errors", "io", "opcount", "cp", "functional", "recompute", "cache", "report", "digest", "updates", "mixed", "layers", "config", "norms",
    "attention", "injection", "merge", "adapters", "allocation", "model", "multitask"]]
# What the core must never need (the `train` extra and other optional packages). NumPy is not
# listed: safetensors.torch.save needs it, so it is a core dependency.
BLOCKED = ["yaml", "tqdm", "matplotlib", "torchvision", "PIL", "transformers", "peft", "timm"]
# The package's layers, lowest first: a module imports only from its own layer or a lower one.
# ``peft`` (FTN as a PEFT method, the optional peft extra) stands on the core alone; no layer
# above imports it, so the engine and the apps never need PEFT.
LAYERS = ["version", "core", "peft", "training", "settings", "apps"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC / "ftn").with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _ftn_imports(module: str) -> set[str]:
    """ftn modules (dotted, below ``ftn``) that ``module`` imports, function-level imports included."""
    path = SRC / "ftn" / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = SRC / "ftn" / module.replace(".", "/") / "__init__.py"
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1] if node.level > 1 else package
            target = ".".join(base + ([node.module] if node.module else []))
            if node.module:
                found.add(target)
            else:  # `from . import a, b`: the names are submodules
                found.update(f"{target}.{a.name}".strip(".") for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ftn."):
            found.add(node.module[4:])
    return found


def test_core_imports_point_one_way():
    for i, module in enumerate(CORE):
        imported = _ftn_imports(module)
        assert imported <= set(CORE[:i]), (module, sorted(imported - set(CORE[:i])))


def test_layers_import_downward_only():
    """core <- training <- settings <- apps: no module imports from a layer above its own."""
    bad = []
    for path in sorted((SRC / "ftn").rglob("*.py")):
        module = _module_name(path)
        if not module or module == "__main__":
            continue
        level = LAYERS.index(module.split(".")[0])
        for target in _ftn_imports(module):
            if target and LAYERS.index(target.split(".")[0]) > level:
                bad.append((module, target))
    assert not bad, bad


def test_nothing_imports_the_peft_layer():
    """ftn.peft is an optional extra on top of the core: nothing else in ftn may import it."""
    bad = [(module, target) for path in sorted((SRC / "ftn").rglob("*.py"))
           if (module := _module_name(path)) and module != "__main__" and module.split(".")[0] != "peft"
           for target in _ftn_imports(module) if target.split(".")[0] == "peft"]
    assert not bad, bad


def test_no_private_name_is_imported_across_packages():
    """A leading underscore means "this package's business": other packages use public names."""
    bad = []
    for path in sorted((SRC / "ftn").rglob("*.py")):
        module = _module_name(path)
        home = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            ours = node.level > 1 or (node.module or "").startswith("ftn.")
            if private and ours:
                bad.append((module, node.module, private))
    assert not bad, bad


# Runs in a fresh interpreter: the harness's libraries look absent (ModuleNotFoundError), the ftn package is a bare
# stub (its __init__ would import everything), and each core module is imported alone.
# Prepended to both scripts: the blocked packages look absent, as if not installed (argv[2]).
_BLOCKER = r"""
import importlib.abc, sys
BLOCKED = set(sys.argv[2].split(","))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

sys.meta_path.insert(0, Block())
"""

_ISOLATED = _BLOCKER + r"""
import importlib, json, types
for name in list(sys.modules):
    if name.split(".")[0] in BLOCKED:
        del sys.modules[name]
loaded = {}
for module in sys.argv[3].split(","):
    for name in [n for n in sys.modules if n == "ftn" or n.startswith("ftn.")]:
        del sys.modules[name]
    stub = types.ModuleType("ftn")
    stub.__path__ = [sys.argv[1] + "/ftn"]
    sys.modules["ftn"] = stub
    importlib.import_module("ftn." + module)
    loaded[module] = sorted(n[4:] for n in sys.modules if n.startswith("ftn.") and n != "ftn.core")
print(json.dumps(loaded))
"""


def test_each_core_module_imports_alone_without_optional_packages():
    out = subprocess.run([sys.executable, "-c", _ISOLATED, str(SRC), ",".join(BLOCKED), ",".join(CORE)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    for i, module in enumerate(CORE):
        assert set(loaded[module]) <= set(CORE[: i + 1]), (module, loaded[module])


_USE_CORE = _BLOCKER + r"""
import tempfile
import torch
from torch import nn
import ftn

torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                    nn.Linear(4, 5), nn.LayerNorm(5))
model = ftn.FTNModel(net, rank=2).eval()
model.add_task("a", head=nn.Linear(5, 3))
with torch.no_grad():
    for p in model.task_parameters("a"):
        p.add_(0.1)
x = torch.randn(2, 3, 8, 8)
y = model(x, task="a")
with tempfile.TemporaryDirectory() as d:
    model.save_task("a", d + "/a.safetensors", info={"labels": ["x", "y", "z"]})
    model.load_task(d + "/a.safetensors", name="b")
torch.testing.assert_close(model(x, task="b"), y)
torch.testing.assert_close(model.merge("a").eval()(x), y, rtol=1e-5, atol=1e-5)
print("ok", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""


def test_import_ftn_works_with_only_torch_and_safetensors():
    out = subprocess.run([sys.executable, "-c", _USE_CORE, "", ",".join(BLOCKED)], capture_output=True, text=True,
                         timeout=300, env={"PYTHONPATH": str(SRC), "PATH": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok []"


_CLI_CORE_ONLY = _BLOCKER + r"""
import contextlib, io, json
from ftn.apps.cli import main

results = {}
for argv in (["params", "--backbone", "resnet18"], ["train", "--config", "configs/embedded_mobilenetv2_ftn.yaml"],
             ["demo", "--quick"]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    results[argv[0]] = [code, err.getvalue()]
print(json.dumps(results))
"""


def test_cli_with_core_only_install_names_the_missing_extra():
    """`pip install factorized-tensor-networks` alone: commands that need the train extra say so
    in one line (exit 2) instead of an ImportError traceback."""
    out = subprocess.run([sys.executable, "-c", _CLI_CORE_ONLY, "", ",".join(BLOCKED)], capture_output=True,
                         text=True, timeout=300, env={"PYTHONPATH": str(SRC), "PATH": ""},
                         cwd=SRC.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for command, (code, err) in results.items():
        assert code == 2, (command, err)
        assert "extra" in err and "pip install 'factorized-tensor-networks[train]'" in err, (command, err)
        assert "Traceback" not in err, (command, err)
