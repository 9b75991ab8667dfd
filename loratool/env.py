"""Environment variables, read when asked (never frozen at import)."""

from __future__ import annotations

import os


def debug_enabled() -> bool:
    return os.environ.get("LORATOOL_DEBUG", "") not in ("", "0", "false")


def progress_disabled() -> bool:
    return os.environ.get("LORATOOL_NO_PROGRESS", "") not in ("", "0", "false")



def direct_io_enabled() -> bool:
    """LORATOOL_NO_DIRECT_IO=1 writes large outputs through the page cache instead of with O_DIRECT."""
    return os.environ.get("LORATOOL_NO_DIRECT_IO", "") in ("", "0", "false")


DEFAULT_HUB_ENDPOINT = "https://huggingface.co"


def hub_endpoint() -> str:
    """HF_ENDPOINT, read on every call (huggingface_hub itself freezes it at import)."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or DEFAULT_HUB_ENDPOINT


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_token(variable: str | None = None) -> str | None:
    """The token from the named variable, else HF_TOKEN, else the cached `hf auth login`."""
    if variable:
        return os.environ.get(variable) or None
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    from huggingface_hub import get_token

    return get_token()
