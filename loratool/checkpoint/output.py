"""Output paths: refuse clobbering and self-overwrites, and publish results atomically and durably.

Every command that writes goes through `atomic_output`: it writes into a temp sibling, and on success
fsyncs every file and folder inside it, renames it onto OUT, then fsyncs OUT's parent folder. So once
a command has returned, a power cut or kernel crash cannot leave an OUT that looks complete but is
empty or truncated: either the old state (nothing, or the previous OUT) or the whole new one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import OutputPathError

TEMP_MARK = ".loratool-tmp-"


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


def check_output_path(out: Path, inputs: Iterable[Path], force: bool) -> None:
    """Refuse an OUT that is an input, lies inside one, or contains one; and an existing OUT without --force.

    Each input is judged as what it is: a folder input keeps OUT out of the whole folder, a file input
    only refuses OUT being that file (or a folder holding it). Pass the paths that are actually read
    (`read_paths`), not a folder that merely holds a one-file input.
    """
    target = out.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if _inside(target, source):
            raise OutputPathError(f"output {out} is, or lies inside, the input {given}; choose another path")
        if _inside(source, target):
            raise OutputPathError(f"output {out} contains the input {given}; writing there could destroy it")
    if out.is_symlink() or out.is_file() or (out.is_dir() and any(out.iterdir())):
        if not force:
            raise OutputPathError(f"output {out} already exists; pass --force to replace it")


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


@contextlib.contextmanager
def atomic_output(out: Path, is_folder: bool) -> Iterator[Path]:
    """Yield a temp sibling of `out` to write into; on success it replaces `out` in one rename.

    Before the rename every file and folder in the temp sibling is fsynced; after it, `out`'s parent.
    On any exception, KeyboardInterrupt included, the temp sibling is removed and `out` is untouched.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.parent / f".{out.name}{TEMP_MARK}{uuid.uuid4().hex[:8]}"
    if is_folder:
        temp.mkdir()
    try:
        yield temp
        make_durable(temp)
        if out.exists() or out.is_symlink():
            trash = out.parent / f".{out.name}{TEMP_MARK}old-{uuid.uuid4().hex[:8]}"
            os.replace(out, trash)
            os.replace(temp, out)
            fsync_path(out.parent)
            _remove(trash)
        else:
            os.replace(temp, out)
            fsync_path(out.parent)
    except BaseException:
        _remove(temp)
        raise
