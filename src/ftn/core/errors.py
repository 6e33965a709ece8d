"""The library's own error types.

Every error a user can provoke with bad input derives from :class:`FTNError`, so callers (and the
CLI) can catch one type and print a clear message instead of a stack trace.
"""

from __future__ import annotations

from collections.abc import Iterable


class FTNError(Exception):
    """Base class of every error raised on purpose by ftn."""


class TaskError(FTNError, KeyError):
    """Unknown task, a task added twice, or no task selected where one is needed."""

    def __str__(self) -> str:  # KeyError would otherwise print the message with quotes
        return str(self.args[0]) if self.args else ""


class ShapeError(FTNError, ValueError):
    """An input or tensor whose shape does not fit the layer or file it is used with."""


class AdapterFileError(FTNError, ValueError):
    """An adapter file that is corrupt, truncated, of a newer format, or made for another backbone."""


class ConfigError(FTNError, ValueError):
    """A configuration key or value that is unknown or invalid."""


class DataError(FTNError, ValueError):
    """A dataset that is missing, malformed, or holds a corrupt sample."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to ``word``, or ``""``: the tail of
    messages about an unknown name."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
