"""Adapter formats. Detection lives here, once; each reader returns the canonical `Adapter`."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import AdapterError
from ..lora.module import Adapter
from .peft import find_peft_folder, read_peft_adapter

FORMATS = ("peft",)


def detect_format(path: str | os.PathLike) -> str | None:
    """The adapter format at `path`, or None when it is not an adapter loratool recognises."""
    path = Path(path)
    if path.exists() and find_peft_folder(path) is not None:
        return "peft"
    return None


def load_adapter(path: str | os.PathLike, format: str | None = None, allow_pickle: bool = False) -> Adapter:
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"{path}: no such file or folder")
    format = format or detect_format(path)
    if format is None:
        raise AdapterError(f"{path}: not a recognised adapter (expected a PEFT folder with adapter_config.json)")
    if format not in FORMATS:
        raise AdapterError(f"unknown adapter format {format!r}; known: {', '.join(FORMATS)}")
    return read_peft_adapter(path, allow_pickle=allow_pickle)
