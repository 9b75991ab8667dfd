"""Human-readable sizes, shared by the CLI and the Hub model card."""

from __future__ import annotations


def format_bytes(nbytes: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as file managers and the Hub show sizes)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:,.0f} {unit}" if unit == "B" else f"{nbytes:,.1f} {unit}"
        nbytes /= 1000
    raise AssertionError
