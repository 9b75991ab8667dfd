"""One place for terminal output: results to stdout, diagnostics and progress to stderr.

rich is imported only when something is rendered with it, so `--json` and quiet runs never pay for it.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import uuid
from collections.abc import Iterator
from functools import cached_property

from .. import env
from ..errors import printable


def error_json(message: str, hint: str | None, exit_code: int) -> None:
    """A failed `--json` run's result on stdout: `{"error", "hint", "exit_code"}` (the `Error:` line still
    goes to stderr). `hint` is null when the message itself says what to do."""
    try:
        sys.stdout.write(json.dumps({"error": message, "hint": hint, "exit_code": exit_code}, indent=2) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, ValueError, OSError):
        pass


def finite_json(value: dict) -> dict:
    """`value` with every NaN or infinite number replaced by null and listed under "problems" (by its
    path): `--json` output is strict JSON, and a non-finite number in a result is something to report."""
    found: list[str] = []

    def clean(item, path: str):
        if isinstance(item, float) and not math.isfinite(item):
            found.append(f"{path} is {item}, not a finite number")
            return None
        if isinstance(item, dict):
            return {k: clean(v, f"{path}.{k}" if path else str(k)) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [clean(v, f"{path}[{i}]") for i, v in enumerate(item)]
        return item

    cleaned = clean(value, "")
    if found:
        cleaned["problems"] = [*cleaned.get("problems", []), *found]
    return cleaned


class Output:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    @cached_property
    def stdout(self):
        from rich.console import Console

        return Console(soft_wrap=True)

    @cached_property
    def stderr(self):
        from rich.console import Console

        return Console(stderr=True, soft_wrap=True)

    def json(self, value, rows: str | None = None) -> None:
        """`value` as indented JSON. With `rows`, the list under that key is written one compact entry per
        line, in chunks, as it is encoded: a listing of 400k tensors costs neither 4M lines of indented
        JSON nor one string of the whole document."""
        value = finite_json({k: None if k == rows else v for k, v in value.items()}) | (
            {rows: value[rows]} if rows in value else {})
        if rows is None or not value.get(rows):
            sys.stdout.write(json.dumps(value, indent=2, sort_keys=False, allow_nan=False) + "\n")
            return
        marker = f"\x00{uuid.uuid4().hex}\x00"  # a string no file can have put in `value` beforehand
        head, tail = json.dumps({**value, rows: marker}, indent=2, sort_keys=False,
                                allow_nan=False).split(json.dumps(marker), 1)
        encode = json.JSONEncoder(separators=(", ", ": "), allow_nan=False).encode
        sys.stdout.write(head + "[\n")
        self.lines(("    " + encode(row) for row in value[rows]), separator=",\n", end="")
        sys.stdout.write("\n  ]" + tail + "\n")

    def lines(self, lines, separator: str = "\n", end: str = "\n", chunk: int = 4096) -> None:
        """Write `lines` (an iterable of str) to stdout as they come, `chunk` at a time, joined by
        `separator`, with `end` after the last one (nothing at all when there are none). For long plain
        listings, which a rich table would lay out whole, in time and memory far beyond linear."""
        batch: list[str] = []
        lead = ""
        for line in lines:
            batch.append(line)
            if len(batch) == chunk:
                sys.stdout.write(lead + separator.join(batch))
                batch, lead = [], separator
        if batch:
            sys.stdout.write(lead + separator.join(batch))
            lead = separator
        if lead:
            sys.stdout.write(end)

    def print(self, *renderables) -> None:
        self.stdout.print(*renderables)

    def note(self, message: str) -> None:
        """A note on stderr; names from files in it are shown escaped, never read as rich markup."""
        if not self.quiet:
            from rich.markup import escape

            self.stderr.print(f"[yellow]note:[/] {escape(printable(message))}", highlight=False)

    def notes_then_json(self, result, as_json: bool) -> bool:
        """Print a command result's notes to stderr, and with --json its `to_json()` to stdout.
        Returns True when the JSON was printed, so the caller skips its human-readable output."""
        for note in result.notes:
            self.note(note)
        if as_json:
            self.json(result.to_json())
        return as_json

    @property
    def progress_enabled(self) -> bool:
        return not self.quiet and not env.progress_disabled() and sys.stderr.isatty() and self.stderr.is_terminal

    @contextlib.contextmanager
    def progress(self, description: str) -> Iterator:
        """Yield a callback `(advance_bytes, total_bytes)` driving a byte bar; None when stderr is not a TTY."""
        if not self.progress_enabled:
            yield None
            return
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=self.stderr, transient=True) as bar:
            task = bar.add_task(description, total=None)
            yield lambda advance, total: bar.update(task, advance=advance, total=total)

    @contextlib.contextmanager
    def status(self, description: str) -> Iterator:
        """A spinner on stderr for long steps without a byte count; yields a callback to update its text
        (a no-op when stderr is not a terminal)."""
        if not self.progress_enabled:
            yield lambda text: None
            return
        with self.stderr.status(description) as spinner:
            yield lambda text: spinner.update(f"{description}: {text}")
