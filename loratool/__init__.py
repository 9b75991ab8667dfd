"""loratool: inspect, merge, convert, extract, resize and combine LoRA adapters and model checkpoints.

`import loratool` is instant: it imports no torch. Each API function is imported, with what it needs,
on first use (`loratool.merge`, `from loratool import inspect`).
"""

from __future__ import annotations

__version__ = "0.1.0"

#: The public API is `loratool.api`'s (a lazy package itself); these names are looked up there.
_API = ("CombineResult", "ConvertResult", "ExtractResult", "LowRankResult", "MergeResult", "combine", "convert",
        "extract", "inspect", "merge", "resize", "svd_extract")

__all__ = sorted([*_API, "__version__"])


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import api

    value = getattr(api, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
