from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LORATOOL_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).parent))

from click.testing import CliRunner  # noqa: E402

from loratool.cli import main  # noqa: E402


class CliResult:
    def __init__(self, code: int, stdout: str, stderr: str):
        self.code, self.stdout, self.stderr = code, stdout, stderr

    def __repr__(self):
        return f"CliResult(code={self.code}, stdout={self.stdout[-500:]!r}, stderr={self.stderr[-1500:]!r})"


@pytest.fixture
def run_cli(monkeypatch):
    """Run `loratool ARGS` in-process through the real `main()` error boundary."""

    def run(*args) -> CliResult:
        with CliRunner().isolation() as (out, err, _):
            code = main([str(a) for a in args])
            sys.stdout.flush()
            sys.stderr.flush()
            stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
        return CliResult(code, stdout, stderr)

    return run


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")
