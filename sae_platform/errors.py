"""Errors a user can act on.

Every error the platform raises for bad input names the problem *and* the fix, so an operator
reading a failed Dagster run knows what to change without reading the code. Text from outside
(a file's name) is passed through ``printable`` before it reaches a terminal or a log.
"""

import numbers
import unicodedata

# Control (ESC, newline, DEL, C1), format (bidi overrides, zero-width), surrogate (an undecodable
# byte of a name) and line/paragraph separator characters: never printed as they are.
_UNPRINTABLE = {"Cc", "Cf", "Cs", "Zl", "Zp"}


def printable(text: str) -> str:
    """``text`` with every control or format character written as its Python escape (``\\x1b``,
    ``\\n``, ``\\u202e``, ``\\udce9``), so a file name printed to a terminal or a log can neither
    colour it, move the cursor, fake a line, reorder what follows, nor fail to encode. Everything
    else is unchanged, so applying it twice changes nothing more."""
    return "".join(ascii(c)[1:-1] if unicodedata.category(c) in _UNPRINTABLE else c for c in text)


class PlatformError(Exception):
    """Base class: a problem with the user's input or configuration, not a bug."""

    def __init__(self, problem: str, fix: str):
        # What a message quotes (a file name, a value) may hold terminal escapes: every message is
        # printable wherever it lands (a run's log, a terminal), its own line breaks kept.
        self.problem = _printable_lines(problem)
        self.fix = _printable_lines(fix)
        super().__init__(f"{self.problem}\n  How to fix: {self.fix}")


def _printable_lines(text) -> str:
    return "\n".join(printable(line) for line in str(text).split("\n"))


class SourceError(PlatformError):
    """The text source matched nothing, or a file in it is unreadable."""


def require_counts(counts: dict, error: type[PlatformError] = PlatformError, where: str = "") -> None:
    """Raise ``error`` naming the first of ``counts`` (setting name -> value) that is not a positive
    integer (a bool is not one): every count a layout, a plan or a shard split divides by or sizes
    arrays with, checked before it is used. ``where``: what prefixes the names in the message (the
    settings' section, e.g. ``resources.training.config.``)."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise error(f"{where}{name} must be a positive integer, got {value!r}",
                        f"set {where}{name} to an integer >= 1")


class ModelError(PlatformError):
    """The base model cannot be found or does not fit what is already stored."""


class StorageError(PlatformError):
    """An artifact is missing, incomplete or incompatible with the request."""


class SourceUnavailable(SourceError):
    """A text file could not be read *now* for a reason outside its content (permissions, a path
    changing while it was opened): not a failure of that file version, so it is tried again."""
