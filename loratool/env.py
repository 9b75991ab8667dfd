"""Environment variables, read when asked (never frozen at import)."""

from __future__ import annotations

import os


def debug_enabled() -> bool:
    return os.environ.get("LORATOOL_DEBUG", "") not in ("", "0", "false")


def progress_disabled() -> bool:
    return os.environ.get("LORATOOL_NO_PROGRESS", "") not in ("", "0", "false")
