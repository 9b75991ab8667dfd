"""SIGINT/SIGTERM for the command line: exit 130 with one line, from the first millisecond on.

`install()` runs before anything heavy is imported. Until the command's error boundary is entered
(`armed()`), an interrupt can only have stopped an import, so it prints the line and leaves at once.
Inside the boundary it raises KeyboardInterrupt, so that every `atomic_output` removes its temp files
on the way out; a second interrupt during that cleanup is ignored, and a third one runs the registered
cleanups (`cleanup()`: temp siblings, lock files, folders `-o` created) itself and leaves at once.
While an output is being published (`deferred()`: the renames, the parent's fsync, the removal of the
replaced copy) interrupts are only recorded; the first one is raised when that step is over, so the
exit-130 line can say truthfully that the complete output is in place (`published()`, `message()`).
Once the command is done, a late interrupt changes nothing: the result already stands.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator

MESSAGE = "Error: interrupted; no output was written"
EXIT_CODE = 130
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {"armed": False, "done": False, "count": 0, "defer": 0, "pending": False, "leaving": False,
          "published": []}
#: Cleanups to run before leaving at once (third interrupt), by token; see `cleanup()`.
_cleanups: dict[int, Callable[[], None]] = {}


def message() -> str:
    """The exit-130 line: what was written, as it stands on disk now."""
    outputs = _state["published"]
    if not outputs:
        return MESSAGE
    from .errors import printable

    names = ", ".join(printable(str(p)) for p in outputs)
    return (f"Error: interrupted after writing; the complete output{'s are' if len(outputs) > 1 else ' is'} "
            f"in place at {names}")


def _leave_now() -> None:
    if _state["leaving"]:  # an interrupt while the cleanups below run: they are short, let them finish
        return
    _state["leaving"] = True
    for callback in reversed(list(_cleanups.values())):
        with contextlib.suppress(BaseException):
            callback()
    with contextlib.suppress(BaseException):
        os.write(2, (("\n" if os.isatty(2) else "") + message() + "\n").encode())
    os._exit(EXIT_CODE)


def _handler(signum, frame) -> None:
    if _state["done"]:
        return
    _state["count"] += 1
    if not _state["armed"]:
        _leave_now()
        return
    if _state["defer"]:  # publishing: raised when that step is over (see `deferred`)
        _state["pending"] = True
        return
    if _state["count"] >= 3:
        _leave_now()
        return
    if _state["count"] == 1:
        raise KeyboardInterrupt
    # A second interrupt while the first one's cleanup runs: let the cleanup finish.


def interrupted() -> bool:
    """Whether SIGINT/SIGTERM arrived during the current command."""
    return _state["count"] > 0 and not _state["done"]


def was_interrupted() -> bool:
    """Whether SIGINT/SIGTERM arrived during the last command (for the process entry point)."""
    return _state["count"] > 0


def leave(code: int) -> None:
    """Flush stdio (and logging) and end the process now, without the interpreter's finalisation."""
    import sys

    if "logging" in sys.modules:
        with contextlib.suppress(Exception):
            sys.modules["logging"].shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            code = code or 141
        except Exception:  # noqa: BLE001 - nothing more can be reported at this point
            pass
    os._exit(code)


def install() -> dict:
    """Install the handlers (main thread only); returns the previous ones for `restore()`."""
    previous = {}
    for signum in _SIGNALS:
        with contextlib.suppress(ValueError, OSError):  # not the main thread, or no such signal
            previous[signum] = signal.signal(signum, _handler)
    return previous


def restore(previous: dict) -> None:
    for signum, handler in previous.items():
        with contextlib.suppress(ValueError, OSError, TypeError):
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def armed() -> Iterator[None]:
    """The command's error boundary: interrupts raise KeyboardInterrupt inside, and are moot after it."""
    _state.update(armed=True, done=False, count=0, defer=0, pending=False, leaving=False, published=[])
    try:
        yield
    finally:
        _state.update(armed=False, done=True)


@contextlib.contextmanager
def deferred(raise_pending: bool = True) -> Iterator[None]:
    """A step that must not be cut in half (publishing an output, removing a temp folder): interrupts
    inside it are recorded, never raised and never turned into leaving at once. On a normal exit an
    interrupt that arrived meanwhile is raised then (with `raise_pending`; otherwise it stays recorded,
    and the command's boundary still sees `interrupted()`)."""
    _state["defer"] += 1
    try:
        yield
    finally:
        _state["defer"] -= 1
    if raise_pending and _state["pending"] and not _state["defer"] and _state["armed"]:
        _state["pending"] = False
        raise KeyboardInterrupt


def published(path) -> None:
    """Record that `path` now holds a complete output (for `message()`); a no-op outside a command."""
    if _state["armed"]:
        _state["published"].append(path)


def cleanup(callback: Callable[[], None]) -> int:
    """Register `callback` to run before the process leaves at once on a third interrupt; returns the
    token for `forget`. Callbacks must be quick and idempotent: they may also run after, or while, the
    normal cleanup runs."""
    token = id(callback)
    _cleanups[token] = callback
    return token


def forget(token: int) -> None:
    _cleanups.pop(token, None)
