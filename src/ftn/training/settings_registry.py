"""The settings ``ftn`` knows, each declared by its own package.

A setting is a package whose ``SETTING`` attribute is a :class:`SettingEntry`: the class that
implements it, how the sweep describes its score, how ``ftn train`` prints a task's metrics and,
optionally, its demo (``ftn demo --<name>``, ``ftn sweep --demo <demo name>``). The registry finds

- every subpackage of :mod:`ftn.settings` (``ftn.settings.<name>``), and
- every package named by an ``ftn.settings`` entry point, for settings outside this project::

      [project.entry-points."ftn.settings"]
      toy = "toy_package"          # toy_package.SETTING (or "toy_package:ENTRY")

so a new setting is a new package: ``ftn train`` / ``ftn demo`` / ``ftn sweep`` need no edit.

Names come from the folder listing and the packaging metadata; a setting's package is imported
only when that setting is used, and its classes and demo functions (``"module:attribute"``
strings) only when called, so loading a config of one setting never imports the libraries of
another (torchvision's models for dense, transformers for text).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ..core.errors import ConfigError, did_you_mean

__all__ = ["Demo", "SettingEntry", "DEFAULT_SETTING", "ENTRY_POINT_GROUP", "SETTINGS", "setting_names",
           "setting_entry", "find_entry", "setting_class", "demo_entries", "demo_entry", "resolve", "refresh"]

#: The setting of a config without a ``setting:`` key, and ``ftn demo``'s without a flag.
DEFAULT_SETTING = "classification"
#: The entry-point group through which other packages add settings.
ENTRY_POINT_GROUP = "ftn.settings"


@dataclass(frozen=True)
class Demo:
    """A setting's demo. Functions are ``"module:attribute"`` strings, imported when called.

    - ``run(output, quick=, progress=, extra=[, methods=])`` trains it and returns its results;
    - ``table(results)`` renders them as markdown (printed after the run);
    - ``sweep(output, quick, overrides)`` returns ``method -> ExperimentConfig``: the config
      ``ftn sweep --demo <name>`` starts each method from (with a validation split to choose the
      learning rate on); None: no ``ftn sweep --demo``.
    """

    name: str  # `ftn sweep --demo NAME` (`ftn demo` takes the setting's name: --dense)
    help: str  # the `ftn demo --<setting>` flag's help
    output: str  # `ftn demo`'s folder when --output is not given
    run: str
    table: str
    sweep: str | None = None
    methods: bool = False  # run() takes `methods=` (`ftn demo --methods ...`)
    done: str = "results in {output}"  # printed last; format fields: output, results


@dataclass(frozen=True)
class SettingEntry:
    """What a setting package declares about itself (its ``SETTING``)."""

    name: str  # the config's `setting:` key
    setting: str  # "module:Class" of its ftn.training.setting.Setting subclass
    score: str = ""  # what the sweep's test score is ("top-1 accuracy (%), mean over tasks")
    # How `ftn train` / `ftn eval` print a task's test metrics: a format string over the metrics'
    # keys ("top-1 {acc:.2f}%"); empty (or a key missing): every metric but the loss.
    headline: str = ""
    demo: Demo | None = None

    def setting_class(self) -> Any:
        return resolve(self.setting)


def resolve(path: str) -> Any:
    """``"package.module:attribute"`` → the attribute (the module imported now)."""
    module, _, attribute = path.partition(":")
    obj = importlib.import_module(module)
    for part in attribute.split(".") if attribute else ():
        obj = getattr(obj, part)
    return obj


def _builtin_names() -> list[str]:
    package = importlib.import_module("ftn.settings")
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if m.ispkg and not m.name.startswith("_"))


@lru_cache(maxsize=1)
def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def setting_names() -> list[str]:
    """Every setting's name, without importing any: the :mod:`ftn.settings` subpackages (sorted),
    then the entry points' (a name of this project's wins over an entry point's)."""
    builtin = _builtin_names()
    return builtin + sorted(n for n in _entry_points() if n not in builtin)


_LOADED: dict[str, SettingEntry] = {}


def find_entry(name: str) -> SettingEntry | None:
    """The entry of setting ``name`` (its package imported), None for an unknown name."""
    if name in _LOADED:
        return _LOADED[name]
    if name in _builtin_names():
        entry = getattr(importlib.import_module(f"ftn.settings.{name}"), "SETTING", None)
        where = f"ftn.settings.{name}"
    elif name in _entry_points():
        entry = _entry_points()[name].load()
        where = f"entry point {name!r} ({_entry_points()[name].value})"
        if not isinstance(entry, SettingEntry):  # a module: its SETTING
            entry = getattr(entry, "SETTING", None)
    else:
        return None
    if not isinstance(entry, SettingEntry):
        raise ConfigError(f"{where} declares no setting (a SETTING = SettingEntry(...))")
    if entry.name != name:
        raise ConfigError(f"{where} declares setting {entry.name!r}, registered as {name!r}")
    _LOADED[name] = entry
    return entry


def setting_entry(name: str) -> SettingEntry:
    """The entry of setting ``name``; an unknown name fails with the known ones."""
    entry = find_entry(name)
    if entry is None:
        names = setting_names()
        raise ConfigError(f"setting must be one of {names}, got {name!r}" + did_you_mean(name, names))
    return entry


def setting_class(name: str) -> Any:
    """The class implementing setting ``name``."""
    return setting_entry(name).setting_class()


def demo_entries() -> dict[str, SettingEntry]:
    """Demo name (``ftn sweep --demo``) → its setting's entry; imports every setting's package."""
    return {e.demo.name: e for e in map(setting_entry, setting_names()) if e.demo is not None}


def demo_entry(name: str) -> SettingEntry:
    """The entry of the setting whose demo is ``name``; an unknown name fails with the known ones."""
    demos = demo_entries()
    if name not in demos:
        raise ConfigError(f"--demo must be one of {list(demos)}, got {name!r}" + did_you_mean(name, demos))
    return demos[name]


def refresh() -> None:
    """Forget what was found (after a package was installed or ``sys.path`` changed)."""
    _entry_points.cache_clear()
    _LOADED.clear()


class _Settings(Mapping[str, str]):
    """Setting name → ``"module:Class"``; listing the names imports nothing."""

    def __getitem__(self, name: str) -> str:
        entry = find_entry(name)
        if entry is None:
            raise KeyError(name)
        return entry.setting

    def __iter__(self) -> Iterator[str]:
        return iter(setting_names())

    def __len__(self) -> int:
        return len(setting_names())

    def __contains__(self, name: object) -> bool:
        return name in setting_names()

    def __repr__(self) -> str:
        return f"SETTINGS({setting_names()})"


#: Every setting: name → "module:Class" (see :func:`setting_names`, :func:`setting_entry`).
SETTINGS: Mapping[str, str] = _Settings()
