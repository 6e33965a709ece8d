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
