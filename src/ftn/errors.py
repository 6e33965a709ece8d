"""The library's own error types.

Every error a user can provoke with bad input derives from :class:`FTNError`, so callers (and the
CLI) can catch one type and print a clear message instead of a stack trace.
"""


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
