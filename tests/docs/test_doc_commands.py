"""Every ``ftn`` command in README.md and docs/ works as written: it parses with the CLI's own
parser, names existing methods, and each ``key=value`` override is accepted by a real config of
the setting it runs (its --config file's, or its demo's). Commands are read from fenced code
blocks, with backslash continuations joined and anything after ``&&``, ``|``, ``;`` or ``>``
dropped."""

from __future__ import annotations

import re
import shlex

import pytest

from ftn.apps.cli import build_parser
from ftn.core.errors import ConfigError
from ftn.training.config import apply_overrides, load_config, new_config
from ftn.training.methods import method_class

from helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
DEMO_SETTING = {"multidomain": "classification", "dense": "dense", "text": "text"}


def _commands() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        if "sweeps" in path.parts:  # raw sweep outputs, not documentation
            continue
        for block in FENCE.findall(path.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip().removeprefix("$ ")
                for part in re.split(r"&&|;|\|(?!\|)", line):
                    part = part.strip()
                    if re.match(r"(nice -n \d+ |timeout \d+ |OMP_NUM_THREADS=\d+ )*ftn\s", part):
                        part = re.sub(r"^(nice -n \d+ |timeout \d+ |OMP_NUM_THREADS=\d+ )*", "", part)
                        found.append((f"{path.relative_to(REPO)}", part.split(" > ")[0].split(" 2>")[0]))
    return found


# A synopsis (`ftn demo [--quick]`) or a template (`$DIR`, `<path>`, `...`) is not a command to run.
TEMPLATE = re.compile(r"\$\{?[A-Za-z_]|<[a-z_ ]+>|\.\.\.|\[-")
COMMANDS = [(where, command) for where, command in _commands() if not TEMPLATE.search(command)]


def _setting(args) -> str:
    if getattr(args, "dense", False) or getattr(args, "demo", None) == "dense":
        return "dense"
    if getattr(args, "text", False) or getattr(args, "demo", None) == "text":
        return "text"
    return "classification"


def test_the_docs_have_commands():
    assert len(COMMANDS) >= 15, COMMANDS  # the reader did not silently stop matching


def _check(where: str, command: str) -> None:
    tokens = shlex.split(command, comments=True)
    try:
        args = build_parser().parse_args(tokens[1:])
    except SystemExit:
        pytest.fail(f"{where}: does not parse: {command}")
    for method in getattr(args, "methods", None) or []:
        method_class(method)
    overrides = list(getattr(args, "overrides", None) or [])
    if not overrides or getattr(args, "config", None) and not (REPO / args.config).exists():
        return
    try:
        if getattr(args, "config", None):
            load_config(REPO / args.config, overrides)
        else:
            apply_overrides(new_config(_setting(args)), overrides)
    except ConfigError as exc:
        pytest.fail(f"{where}: {command}\n{exc}")


@pytest.mark.parametrize("where,command", COMMANDS, ids=[f"{w}:{c[:60]}" for w, c in COMMANDS])
def test_every_documented_command_parses_and_its_overrides_are_accepted(where, command):
    _check(where, command)


def test_a_wrong_command_would_be_caught():
    with pytest.raises(pytest.fail.Exception, match="method.ftn.rank"):
        _check("doc", "ftn train --config configs/embedded_mobilenetv2_ftn.yaml method.rank=16")
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        _check("doc", "ftn demo --no-such-flag")


# ----------------------------------------------------------------------------- install lines
def _extras() -> set[str]:
    import tomllib

    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def _pip_installs() -> list[tuple[str, list[str]]]:
    """Every ``pip install ...`` of a fenced block (README, docs) as (where, its arguments)."""
    found = []
    for path in DOCS:
        if "sweeps" in path.parts:
            continue
        for block in FENCE.findall(path.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                if "pip install" not in line:
                    continue
                lexer = shlex.shlex(line.strip().removeprefix("$ "), posix=True, punctuation_chars=";&|")
                lexer.whitespace_split = True
                command: list[str] = []
                for token in [*lexer, ";"]:  # commands end at ;, &&, ||, | and the line's end
                    if token.strip(";&|"):
                        command.append(token)
                        continue
                    if command[:2] == ["pip", "install"]:
                        found.append((f"{path.relative_to(REPO)}: {' '.join(command)}", command[2:]))
                    command = []
    return found


OUR_NAME = re.compile(r"^(?:\.|factorized-tensor-networks)(?:\[([a-z0-9_,\-]*)\])?$")


def _check_install(where: str, args: list[str], extras: set[str]) -> None:
    """Our package: from the clone (``.``, ``-e .``) with extras pyproject.toml declares; another
    package pinned ``==`` must be the version installed here, when it is; an index URL only
    PyTorch's CPU wheels."""
    for i, arg in enumerate(args):
        if i and args[i - 1] in ("--index-url", "--extra-index-url"):
            assert arg == "https://download.pytorch.org/whl/cpu", where
            continue
        if arg.startswith("-"):
            continue
        ours = OUR_NAME.match(arg)
        if ours:
            named = {e for e in (ours.group(1) or "").split(",") if e}
            assert named <= extras, f"{where}: no extra {sorted(named - extras)} in pyproject.toml ({sorted(extras)})"
            assert arg.startswith("."), f"{where}: ftn is not on PyPI; install it from the clone (pip install -e .)"
        elif "==" in arg:
            from importlib.metadata import PackageNotFoundError, version

            name, pinned = arg.split("==")
            try:
                assert version(name) == pinned, f"{where}: {name} {version(name)} is installed, the docs pin {pinned}"
            except PackageNotFoundError:
                pass


def test_every_pip_install_line_names_what_the_project_has():
    installs = _pip_installs()
    assert len(installs) >= 5, installs  # the reader did not silently stop matching
    assert any("download.pytorch.org/whl/cpu" in w for w, _ in installs)  # the CPU-only install is documented
    extras = _extras()
    for where, args in installs:
        _check_install(where, args, extras)


def test_a_wrong_install_line_would_be_caught():
    extras = _extras()
    with pytest.raises(AssertionError, match="no extra"):
        _check_install("doc", ["-e", ".[train,no_such_extra]"], extras)
    with pytest.raises(AssertionError, match="not on PyPI"):
        _check_install("doc", ["factorized-tensor-networks[train]"], extras)
    with pytest.raises(AssertionError, match="the docs pin 0.0.1"):
        _check_install("doc", ["--no-deps", "pytest==0.0.1"], extras)


# ----------------------------------------------------------------------------- the documentation list
def test_readme_links_every_doc():
    readme = (REPO / "README.md").read_text()
    linked = set(re.findall(r"\]\((docs/[^)#]+)", readme))
    docs = {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")} | {"docs/results/README.md"}
    assert docs - linked == set(), f"README's 'Where to read more' does not link {sorted(docs - linked)}"
    assert all((REPO / link).exists() for link in linked), sorted(l for l in linked if not (REPO / l).exists())
