"""Output paths: refuse clobbering and self-overwrites, and publish results atomically."""

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


def check_output_path(out: Path, inputs: Iterable[Path], force: bool) -> None:
    """Refuse an OUT that is an input, lies inside one, or contains one; and an existing OUT without --force."""
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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_output(out: Path, is_folder: bool) -> Iterator[Path]:
    """Yield a temp sibling of `out` to write into; on success it replaces `out` in one rename.

    On any exception, KeyboardInterrupt included, the temp sibling is removed and `out` is untouched.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.parent / f".{out.name}{TEMP_MARK}{uuid.uuid4().hex[:8]}"
    if is_folder:
        temp.mkdir()
    try:
        yield temp
        if out.exists() or out.is_symlink():
            trash = out.parent / f".{out.name}{TEMP_MARK}old-{uuid.uuid4().hex[:8]}"
            os.replace(out, trash)
            os.replace(temp, out)
            _remove(trash)
        else:
            os.replace(temp, out)
    except BaseException:
        _remove(temp)
        raise
