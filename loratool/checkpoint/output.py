"""Output paths: refuse clobbering and self-overwrites, and publish results atomically and durably.

Every command that writes goes through `atomic_output`: it writes into a temp sibling, and on success
fsyncs every file and folder inside it, renames it onto OUT, then fsyncs OUT's parent folder. So once
a command has returned, a power cut or kernel crash cannot leave an OUT that looks complete but is
empty or truncated: either the old state (nothing, or the previous OUT) or the whole new one.

Only a regular file or a folder (or a symlink, which is replaced itself, never its target) can be
replaced, and only with --force: a FIFO, a device or a socket at OUT is refused before anything is
written. From the check that OUT is free to the rename, a lock file beside OUT (`.OUT.loratool-tmp-lock`,
held with `flock`, so a killed run leaves no stale lock) keeps a second loratool run off the same OUT:
of two runs to the same new OUT, one refuses. The rename and the removal of a replaced copy are not
cut by an interrupt (`interrupts.deferred`), and folders that `-o` created are removed on failure.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from .. import interrupts
from ..errors import InvalidCheckpointError, OutputPathError, printable

try:
    import fcntl
except ImportError:  # not POSIX: an exclusive create stands in for flock
    fcntl = None

TEMP_MARK = ".loratool-tmp-"
#: The lock file beside OUT is `.OUT` + LOCK_SUFFIX; it carries TEMP_MARK, so checks for leftovers see it.
LOCK_SUFFIX = TEMP_MARK + "lock"
#: The decision `check_output_path` made per OUT (absolute path -> force), for `atomic_output`.
_approved: dict[str, bool] = {}

_SPECIAL = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def read_paths(given: object, read_as: Path) -> list[Path]:
    """The paths a command really reads for one input, for `check_output_path`.

    `given` is what the user named; `read_as` is what the reader took as the input (an `Adapter`'s
    `path`). A folder the user named is read as a whole, so it is the input. A file the user named is
    that file, and when the reader took the file's folder as the unit (PEFT's `adapter_model.safetensors`,
    read with the `adapter_config.json` beside it), also the folder's JSON side files, never the whole
    folder: a new file beside a one-file adapter harms nothing it reads. Anything else (an `Adapter`
    object passed from Python, a file read as some other folder) is `read_as`, judged as a whole.
    """
    read_as = Path(read_as)
    if not isinstance(given, (str, os.PathLike)):
        return [read_as]
    given = Path(given)
    if not given.is_file() or read_as.resolve() == given.resolve():
        return [given]
    if read_as.resolve() == given.absolute().parent.resolve():
        return [given, *sorted(p for p in read_as.glob("*.json") if p.is_file())]
    return [given, read_as]


def special_kind(mode: int) -> str | None:
    """What a file of this `st_mode` is, when it is not a regular file, a folder or a symlink."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
        return None
    return next((name for test, name in _SPECIAL if test(mode)), "neither a file nor a folder")


def _refuse_special(out: Path) -> None:
    """Refuse an OUT that exists as something other than a regular file or a folder: a FIFO, a device, a
    socket, or a symlink to one of them. With or without --force; nothing has been written when this
    refuses."""
    try:
        kind = special_kind(os.lstat(out).st_mode)
        if kind is None and out.is_symlink():
            kind = special_kind(os.stat(out).st_mode)
            kind = kind and f"a symlink to {kind}"
    except OSError:  # nothing there, or a dangling or looping symlink (the link itself would be replaced)
        return
    if kind is not None:
        raise OutputPathError(f"output {out} is {kind}; only a regular file or folder can be replaced, "
                              "so choose another path")


def _occupied(out: Path) -> bool:
    """Whether OUT is something only --force may replace (anything but nothing or an empty real folder)."""
    if not os.path.lexists(out):
        return False
    return out.is_symlink() or not out.is_dir() or any(out.iterdir())


def check_output_path(out: Path, inputs: Iterable[Path], force: bool) -> None:
    """Refuse an OUT that is an input, lies inside one, or contains one; one that is a FIFO, a device or a
    socket; and an existing OUT without --force.

    Each input is judged as what it is: a folder input keeps OUT out of the whole folder, a file input
    only refuses OUT being that file (or a folder holding it). Pass the paths that are actually read
    (`read_paths`), not a folder that merely holds a one-file input. The decision about --force is kept
    for `atomic_output`, which checks OUT again under its lock, before it writes and before it renames.
    """
    out = Path(out)
    _refuse_special(out)
    target = out.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if _inside(target, source):
            raise OutputPathError(f"output {out} is, or lies inside, the input {given}; choose another path")
        if _inside(source, target):
            raise OutputPathError(f"output {out} contains the input {given}; writing there could destroy it")
    if _occupied(out) and not force:
        raise OutputPathError(f"output {out} already exists; pass --force to replace it")
    _approved[os.path.abspath(out)] = force


def fsync_path(path: Path) -> None:
    """fsync one file or folder by path (a folder's fsync makes the names inside it durable)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_durable(root: Path) -> None:
    """fsync every regular file under `root` (or `root` itself), then every folder, deepest first."""
    if not root.is_dir() or root.is_symlink():
        fsync_path(root)
        return
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            path = Path(folder, name)
            if path.is_file() and not path.is_symlink():
                fsync_path(path)
        fsync_path(Path(folder))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class _Publish:
    """One `atomic_output`'s state, for its cleanup: run on failure, and by a third interrupt."""

    def __init__(self, out: Path):
        self.out = out
        self.created: list[Path] = []  # folders made for OUT's parent, outermost first
        self.lock: tuple[int, Path] | None = None
        self.temp: Path | None = None
        self.trash: Path | None = None  # the replaced OUT, moved aside during a --force swap
        self.done = False  # the new output is at OUT

    def unlock(self) -> None:
        lock, self.lock = self.lock, None
        if lock is not None:
            fd, path = lock
            with contextlib.suppress(OSError):
                os.unlink(path)  # before the flock goes, so a waiting run sees a fresh lock file
            with contextlib.suppress(OSError):
                os.close(fd)

    def cleanup(self) -> None:
        """Undo what is not published and remove what is left over; safe to run twice, or interrupted
        and run again."""
        out, trash = self.out, self.trash
        if trash is not None and os.path.lexists(trash):
            if not self.done and not os.path.lexists(out):
                with contextlib.suppress(OSError):
                    os.replace(trash, out)  # the swap was cut between its renames: the old OUT goes back
            if os.path.lexists(trash):
                _remove(trash)
        if self.temp is not None and not self.done:
            _remove(self.temp)
        self.unlock()
        if not self.done:
            while self.created:
                try:
                    os.rmdir(self.created[-1])
                except FileNotFoundError:
                    pass
                except OSError:  # something else has been put there meanwhile: it stays
                    break
                self.created.pop()


def _make_parents(folder: Path, created: list[Path]) -> None:
    """mkdir -p `folder`, recording in `created` each folder this made (outermost first)."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for path in reversed(missing):
        try:
            os.mkdir(path)
        except FileExistsError:
            if path.is_dir():  # made by someone else meanwhile: not ours to remove
                continue
            raise
        created.append(path)


def _lock(out: Path) -> tuple[int, Path]:
    """Take the lock file beside OUT, or refuse because another run holds it."""
    path = out.parent / f".{out.name}{LOCK_SUFFIX}"
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | \
        getattr(os, "O_NONBLOCK", 0) | (os.O_EXCL if fcntl is None else 0)
    for _ in range(100):
        try:
            fd = os.open(path, flags, 0o644)
        except FileExistsError:  # without flock: an exclusive create, so a killed run's lock stays
            raise OutputPathError(f"another loratool run is writing {out} (lock file {path}); wait for it, "
                                  "or delete that file if no run is writing") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OutputPathError(f"{path}, the lock file for output {out}, is a symlink; remove it") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OutputPathError(f"{path}, the lock file for output {out}, is not a regular file; remove it")
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                    pid = f" (pid {holder})" if holder.isdigit() else ""
                    raise OutputPathError(f"another loratool run{pid} is writing {out}; wait for it to finish "
                                          "or choose another path") from None
                except OSError as e:  # a filesystem without flock: go on unlocked, as before
                    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        raise
                try:
                    current = os.stat(path, follow_symlinks=False)
                except FileNotFoundError:
                    current = None
                if current is None or not os.path.samestat(os.fstat(fd), current):
                    os.close(fd)  # a finishing run removed this lock file after we opened it: take a new one
                    continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd, path
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
    raise OutputPathError(f"could not take the lock file {path} for output {out}; try again")


def _check_free(out: Path, force: bool) -> None:
    _refuse_special(out)
    if not force and _occupied(out):
        raise OutputPathError(f"output {out} already exists; pass --force to replace it")


def _publish(state: _Publish, force: bool) -> None:
    """Rename the temp sibling onto OUT. One rename where it replaces in one step (nothing there, a file or
    symlink replaced by a file, an empty folder by a folder); otherwise the old OUT is moved aside first,
    and put back if the second rename fails."""
    out, temp = state.out, state.temp
    _check_free(out, force)
    if os.path.lexists(out):
        empty_dir = out.is_dir() and not out.is_symlink() and not any(out.iterdir())
        one_step = empty_dir if temp.is_dir() else not out.is_dir() or out.is_symlink()
    else:
        one_step = True
    if one_step:
        os.replace(temp, out)
    else:
        state.trash = out.parent / f".{out.name}{TEMP_MARK}old-{uuid.uuid4().hex[:8]}"
        os.replace(out, state.trash)
        try:
            os.replace(temp, out)
        except BaseException:
            with contextlib.suppress(OSError):
                os.replace(state.trash, out)
            state.trash = None
            raise
    state.done = True
    interrupts.published(out)


@contextlib.contextmanager
def atomic_output(out: Path, is_folder: bool, force: bool | None = None) -> Iterator[Path]:
    """Yield a temp sibling of `out` to write into; on success it replaces `out` in one rename.

    `force` defaults to what `check_output_path` decided for this OUT (False when it was not asked).
    Before anything is written, OUT is checked again under a lock file beside it, which a second loratool
    run writing the same OUT finds taken (it refuses). Before the rename every file and folder in the temp
    sibling is fsynced; after it, `out`'s parent. The rename, that fsync and the removal of a replaced
    copy are one step that interrupts do not cut (`interrupts.deferred`). On any exception,
    KeyboardInterrupt included, the temp sibling, the lock file and the folders made for OUT's parent are
    removed, and `out` is as it was.
    """
    out = Path(out)
    if force is None:
        force = _approved.pop(os.path.abspath(out), False)
    _refuse_special(out)  # before anything is created: `-o /dev/null` never gets a lock file beside it
    state = _Publish(out)
    token = interrupts.cleanup(state.cleanup)
    try:
        _make_parents(out.parent, state.created)
        state.lock = _lock(out)
        _check_free(out, force)
        state.temp = out.parent / f".{out.name}{TEMP_MARK}{uuid.uuid4().hex[:8]}"
        if is_folder:
            state.temp.mkdir()
        yield state.temp
        make_durable(state.temp)
        with interrupts.deferred():
            _publish(state, force)
            fsync_path(out.parent)
            if state.trash is not None:
                _remove(state.trash)
            state.unlock()
    except BaseException:
        with interrupts.deferred(raise_pending=False):
            state.cleanup()
        raise
    finally:
        interrupts.forget(token)


# --- copies of files the output takes over from an input --------------------------------------------------

_COPY_CHUNK = 1 << 30


def _not_copied(path: Path, what: str) -> InvalidCheckpointError:
    return InvalidCheckpointError(f"{printable(str(path))} is {what}; only regular files and folders are copied, "
                                  "so remove it from the input folder (or replace it with a regular file)")


def copy_regular_file(source: Path, target: Path) -> None:
    """Copy `source` to the new file `target` when it is a regular file (a symlink to one is followed):
    exactly the size its stat gives, so a file that grows while it is copied cannot make the copy endless;
    a FIFO, a device or a socket is refused, never opened for a blocking read. Mode and times are kept,
    as `shutil.copy2` keeps them."""
    try:
        fd = os.open(source, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise _not_copied(source, "a broken symlink" if os.path.islink(source) else "missing") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _not_copied(source, special_kind(info.st_mode) or "a folder")
        target_fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            done = 0
            while done < info.st_size:
                count = min(info.st_size - done, _COPY_CHUNK)
                try:
                    copied = os.copy_file_range(fd, target_fd, count, done, done)
                except (AttributeError, OSError):  # no copy_file_range here, or not across these filesystems
                    data = os.pread(fd, min(count, 1 << 24), done)
                    copied = len(data)
                    view = memoryview(data)
                    while view:
                        view = view[os.pwrite(target_fd, view, done + copied - len(view)):]
                if copied == 0:
                    raise InvalidCheckpointError(f"{printable(str(source))} shrank while it was copied; copy it "
                                                 "again when nothing is writing it")
                done += copied
            os.fchmod(target_fd, stat.S_IMODE(info.st_mode))
            os.utime(target_fd, ns=(info.st_atime_ns, info.st_mtime_ns))
        finally:
            os.close(target_fd)
    finally:
        os.close(fd)


def copy_regular(source: Path, target: Path, _above: frozenset = frozenset()) -> None:
    """Copy a regular file (`copy_regular_file`) or a folder of them, following symlinks, to the new path
    `target`. Anything else inside (a FIFO, device, socket or broken symlink, or a symlink back to a
    folder above it) is refused with one line naming it, before its bytes could be read."""
    try:
        info = os.stat(source)
    except FileNotFoundError:
        raise _not_copied(source, "a broken symlink" if os.path.islink(source) else "missing") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _not_copied(source, "a symlink loop") from None
        raise
    if stat.S_ISREG(info.st_mode):
        copy_regular_file(source, target)
        return
    if not stat.S_ISDIR(info.st_mode):
        raise _not_copied(source, special_kind(info.st_mode) or "not a regular file")
    key = (info.st_dev, info.st_ino)
    if key in _above:
        raise _not_copied(source, "a symlink to a folder above it (the copy would never end)")
    os.mkdir(target)
    for entry in sorted(os.listdir(source)):
        copy_regular(source / entry, target / entry, _above | {key})
    shutil.copystat(source, target)
