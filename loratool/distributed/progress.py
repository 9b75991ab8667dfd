"""The progress bar of a run on a Ray cluster: one bar over all tasks' bytes, naming the nodes in use."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..cli.output import Output


class _Bar:
    """A (done, total) progress callback with `describe(text)`, which the runner calls with the nodes."""

    def __init__(self, bar, task, description: str):
        self.bar, self.task, self.description = bar, task, description

    def __call__(self, advance: int, total: int) -> None:
        self.bar.update(self.task, advance=advance, total=total)

    def describe(self, text: str) -> None:
        self.bar.update(self.task, description=f"{self.description} ({text})")


@contextlib.contextmanager
def task_progress(out: Output, description: str, ray: str | None) -> Iterator:
    """`out.progress(description)` without `--ray`; with it, a bar that also says how many tasks ran on
    how many nodes. None when stderr is not a terminal (or --quiet)."""
    if ray is None:
        with out.progress(description) as advance:
            yield advance
        return
    if not out.progress_enabled:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=out.stderr, transient=True) as bar:
        yield _Bar(bar, bar.add_task(f"{description} on Ray", total=None), f"{description} on Ray")
