"""SIGINT/SIGTERM for the command line: exit 130 with one line, from the first millisecond on.

`install()` runs before anything heavy is imported. Until the command's error boundary is entered
(`armed()`), an interrupt can only have stopped an import, so it prints the line and leaves at once.
Inside the boundary it raises KeyboardInterrupt, so that every `atomic_output` removes its temp files
on the way out; further interrupts during that cleanup are ignored, and a third one leaves at once.
Once the command is done, a late interrupt changes nothing: the result already stands.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

MESSAGE = "Error: interrupted; no output was written"
EXIT_CODE = 130
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {"armed": False, "done": False, "count": 0}


def _leave_now() -> None:
    with contextlib.suppress(OSError):
        os.write(2, (("\n" if os.isatty(2) else "") + MESSAGE + "\n").encode())
    os._exit(EXIT_CODE)


def _handler(signum, frame) -> None:
    if _state["done"]:
        return
    _state["count"] += 1
    if not _state["armed"] or _state["count"] >= 3:
        _leave_now()
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
    _state.update(armed=True, done=False, count=0)
    try:
        yield
    finally:
        _state.update(armed=False, done=True)
