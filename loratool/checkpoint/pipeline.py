"""Overlap disk I/O with arithmetic: one reader thread runs ahead, one writer thread runs behind.

torch and the os read/write calls release the GIL, so on two cores the kernel's page copying and the
float math run at the same time. Queues in both directions are bounded, and merge streams large
tensors as row chunks through a fixed pool of reused buffers (`BufferPool`), so memory stays bounded
by a few chunks whatever the model and tensor size.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

_POLL = 0.1


class BackgroundWriter:
    """Runs submitted write calls in order on one thread; the first failure is re-raised to the caller."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="loratool-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            call, cleanup = item
            if self._error is None:
                try:
                    call()
                except BaseException as e:  # handed back to the submitting thread
                    self._error = e
            if cleanup is not None:
                cleanup()

    def submit(self, call: Callable[[], None], cleanup: Callable[[], None] | None = None) -> None:
        """Queue `call`; `cleanup` runs after it even when it or an earlier call failed (to give back
        buffers that a reader may be waiting for)."""
        if self._error is not None:
            if cleanup is not None:
                cleanup()
            raise self._error
        self._queue.put((call, cleanup))

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


class Stopped(Exception):
    """The pipeline is being torn down; a blocked reader gives up."""


class BufferPool:
    """A fixed number of equal byte buffers, handed out and given back; `take` blocks while all are out.

    Bounds the memory of a streamed merge at `count × size` bytes whatever the tensor sizes."""

    def __init__(self, count: int, size: int, stop: threading.Event):
        import torch

        self.size = size
        self._stop = stop
        self._free: queue.Queue = queue.Queue()
        for _ in range(count):
            self._free.put(torch.empty(size, dtype=torch.uint8))

    def take(self):
        while True:
            try:
                return self._free.get(timeout=_POLL)
            except queue.Empty:
                if self._stop.is_set():
                    raise Stopped from None

    def give(self, buffer) -> None:
        self._free.put(buffer)


class ReadAhead:
    """The one read-ahead pipeline: runs `read(request)` for each request in order on one reader thread,
    and `get()` returns the results in the same order.

    The reader runs ahead by at most `depth + 1` results: up to `depth` finished ones wait for `get()`,
    and one more is being read (or waits, read, in the reader's hands). `depth=0` is plain double
    buffering: the next result is read while the caller works on the current one. A read's exception
    is raised by the `get()` that would have returned its result, and the reader stops there. A read
    that raises `Stopped`, or `close()`, ends the reader."""

    def __init__(self, read: Callable[[object], object], requests: list, depth: int = 2,
                 stop: threading.Event | None = None):
        if depth < 0:
            raise ValueError(f"depth must be >= 0, not {depth}")
        self.stop = stop or threading.Event()
        self._slots = threading.Semaphore(depth + 1)
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(read, requests), name="loratool-reader",
                                        daemon=True)
        self._thread.start()

    def _run(self, read, requests) -> None:
        for request in requests:
            while not self._slots.acquire(timeout=_POLL):
                if self.stop.is_set():
                    return
            if self.stop.is_set():
                return
            try:
                self._results.put((True, read(request)))
            except Stopped:
                return
            except BaseException as e:  # handed to the consumer
                self._results.put((False, e))
                return

    def get(self):
        ok, value = self._results.get()
        self._slots.release()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self.stop.set()
        self._thread.join()
