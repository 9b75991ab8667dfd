"""Typed errors. Every `LoratoolError` is the user's to fix: the CLI prints it as one line and exits 2.

Messages name the file or tensor at fault and, where there is one, the fix.
"""

from __future__ import annotations


class LoratoolError(Exception):
    """Bad input or a refused operation (exit code 2)."""

    exit_code = 2


class InvalidCheckpointError(LoratoolError):
    """A checkpoint file or index that is malformed, truncated or inconsistent."""


class PickleRefusedError(LoratoolError):
    """A pickle-based checkpoint was given without `--allow-pickle`, or failed the safe loader."""


class AdapterError(LoratoolError):
    """An adapter that cannot be read, or uses a feature loratool refuses."""


class MismatchError(LoratoolError):
    """Adapter and base disagree: unknown modules, shape clashes, tied weights."""


class NonFiniteError(LoratoolError):
    """NaN or Inf where finite values are required."""


class OutputPathError(LoratoolError):
    """An output path that exists, or that is (or lies inside) an input."""


class UsageError(LoratoolError):
    """Option values that do not fit together (wrong number of weights, bad size string...)."""


def printable(text: str) -> str:
    """`text` with every character that is not printable (newline, tab, ESC and the rest of C0/C1, bidi
    and other format characters, lone surrogates) written as Python's repr writes it (`\\n`, `\\x1b`,
    `\\u202e`), so that a name read from a file can neither split a line nor drive the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)


def summarize(problems: list[str], limit: int = 5) -> str:
    """Join problems into one line, naming how many were left out."""
    shown = "; ".join(problems[:limit])
    extra = len(problems) - limit
    return f"{shown}; and {extra} more" if extra > 0 else shown
