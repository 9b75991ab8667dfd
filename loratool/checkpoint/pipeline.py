"""Overlap disk I/O with arithmetic: reads run one tensor ahead, writes one tensor behind.

torch and the os read/write calls release the GIL, so on two cores the kernel's page copying and the
float math run at the same time. At most one tensor waits in each direction, so memory stays bounded
by a few tensors whatever the model size.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class BackgroundWriter:
    """Runs submitted write calls in order on one thread; the first failure is re-raised to the caller."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="loratool-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    item()
                except BaseException as e:  # handed back to the submitting thread
                    self._error = e

    def submit(self, call: Callable[[], None]) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(call)

    def close(self) -> None:
        """Wait for queued writes; re-raise the first failure."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Stop after the write in progress, dropping the rest (the output is being discarded)."""
        self._error = self._error or RuntimeError("aborted")
        self._queue.put(None)
        self._thread.join()


class Prefetcher:
    """Reads the next tensor while the current one is being computed."""

    def __init__(self, read: Callable[[str], object], names: list[str]):
        self._read = read
        self._names = names
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loratool-reader")
        self._pending: dict[str, Future] = {}
        self._position = 0

    def get(self, name: str):
        future = self._pending.pop(name, None)
        value = future.result() if future is not None else self._read(name)
        while self._position < len(self._names) and self._names[self._position] != name:
            self._position += 1
        self._position += 1
        if self._position < len(self._names):
            upcoming = self._names[self._position]
            self._pending[upcoming] = self._pool.submit(self._read, upcoming)
        return value

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pool.shutdown(wait=True)
