"""Every example in ``ftn <command> --help`` works: each ``key=value`` override (and each grid
axis ``[methods:]key=v1,v2``) is accepted by a real config, each method named in one exists,
each ``--flag`` mentioned is an option of that command, and every example command line
(a line starting with ``ftn`` in a description or epilog) parses."""

from __future__ import annotations

import argparse
import copy
import re
import shlex

import pytest

from ftn.apps.cli import build_parser
from ftn.apps.sweep import parse_axis
from ftn.core.errors import ConfigError
from ftn.training.config import apply_overrides, new_config
from ftn.training.methods import method_class

SETTINGS = ("classification", "dense", "text")
# An override in prose: optional "methods:" (a grid axis), a dotted lower-case key, "=", a value.
OVERRIDE = re.compile(r"(?<![\w.\-])(?:([a-z_]+(?:,[a-z_]+)*):)?([a-z_]+(?:\.[a-z_0-9]+)+)=([^\s'\"\])]+)")
GROUP = re.compile(r"(?<![\w\-])([a-z_]+)\[([a-z_.]+=[^\]\s]+)\]")  # a sweep group: method[key=value]
BARE_KEY = re.compile(r"e\.g\. ([a-z_]+(?:\.[a-z_]+)+)(?=[\s),;]|$)")
FLAG = re.compile(r"(?<![\w\-])(--[a-z][a-z0-9\-]*)")


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


_CONFIGS: dict[str, object] = {}


def _config(setting: str):
    if setting not in _CONFIGS:
        _CONFIGS[setting] = new_config(setting)
    return copy.deepcopy(_CONFIGS[setting])


def _accepted(override: str, method: str | None = None) -> bool:
    """Whether some setting's config takes ``override`` (with method ``method``)."""
    errors = []
    for setting in SETTINGS:
        try:
            cfg = apply_overrides(_config(setting), [f"method.name={method}"] if method else [])
            apply_overrides(cfg, [override])
            return True
        except ConfigError as exc:
            errors.append(f"{setting}: {exc}")
    pytest.fail(f"{override!r} is not a valid override: {errors}")


def _has_key(key: str) -> bool:
    for setting in SETTINGS:
        obj = _config(setting)
        try:
            for part in key.split("."):
                obj = getattr(obj, part)
            return True
        except AttributeError:
            continue
    pytest.fail(f"{key!r} is not a config key of any setting")


def _examples(command: str, parser: argparse.ArgumentParser) -> list[tuple[str, str, bool]]:
    """(where, text, whether its examples are grid axes) of the command's description, epilog and
    each option's help."""
    texts = [(f"{command} description", parser.description or "", False),
             (f"{command} epilog", parser.epilog or "", False)]
    for action in parser._actions:
        if action.help and action.help != argparse.SUPPRESS:
            texts.append((f"{command} {'/'.join(action.option_strings) or action.dest}", str(action.help),
                          "V1,V2" in str(action.metavar or "")))
    return texts


def _check_text(command: str, parser: argparse.ArgumentParser, where: str, text: str, axis: bool) -> int:
    checked = 0
    text = " ".join(text.split())
    for methods, key, value in OVERRIDE.findall(text):
        if methods or axis:  # a --grid / --tune axis: each value for each of its methods
            parsed = parse_axis(f"{methods}:{key}={value}" if methods else f"{key}={value}")
            for method in parsed.methods or ("ftn",):
                method_class(method)
                for v in parsed.values:
                    assert _accepted(f"{key}={v}", method), (where, key, v)
        else:
            assert _accepted(f"{key}={value}"), (where, key, value)
        checked += 1
    for method, override in GROUP.findall(text):
        method_class(method)
        assert _accepted(override, method), (where, override)
        checked += 1
    for key in BARE_KEY.findall(text):
        assert _has_key(key), (where, key)
        checked += 1
    options = {s for a in parser._actions for s in a.option_strings}
    for flag in FLAG.findall(text):
        assert flag in options, f"{where}: {flag} is not an option of ftn {command}"
        checked += 1
    return checked


def test_every_example_in_the_help_is_valid():
    checked = 0
    for command, parser in _commands().items():
        parser.format_help()  # the help renders (lazy choices and flags included)
        for where, text, axis in _examples(command, parser):
            checked += _check_text(command, parser, where, text, axis)
            for line in text.splitlines():  # a whole example command
                line = line.strip().removeprefix("$ ")
                if line.startswith("ftn "):
                    tokens = shlex.split(line)
                    assert tokens[1] == command, line
                    try:
                        args = build_parser().parse_args(tokens[1:])
                    except SystemExit:
                        pytest.fail(f"example does not parse: {line}")
                    for override in getattr(args, "overrides", []):
                        assert _accepted(override), (line, override)
                    checked += 1
    assert checked >= 10  # the examples were found (the patterns did not silently stop matching)


def test_a_wrong_example_would_be_caught():
    """The check itself: the train help's old example, method.rank=16, is not a config key."""
    with pytest.raises(pytest.fail.Exception, match="method.ftn.rank"):
        _check_text("train", _commands()["train"], "train overrides", "e.g. method.rank=16", False)
    with pytest.raises(AssertionError, match="--no-such-flag"):
        _check_text("train", _commands()["train"], "train", "see --no-such-flag", False)


def test_every_install_hint_names_an_extra_the_project_has():
    """A command that needs an optional package says `pip install '...[<extra>]'`: every extra it
    can name is declared in pyproject.toml (the docs' own install lines: tests/docs)."""
    import tomllib

    from ftn.apps.cli import _EXTRAS, _missing_extra
    from helpers import REPO

    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert set(_EXTRAS.values()) <= extras, sorted(set(_EXTRAS.values()) - extras)
    message = _missing_extra(ModuleNotFoundError("No module named 'yaml'", name="yaml"))
    assert message is not None and "[train]" in message
    assert _missing_extra(ModuleNotFoundError("No module named 'nope'", name="nope")) is None
