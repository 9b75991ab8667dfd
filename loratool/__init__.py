"""loratool: inspect, merge, convert, extract, resize and combine LoRA adapters and model checkpoints.

`import loratool` is instant: it imports no torch. The public API is this package's names
(`loratool.merge`, `from loratool import inspect, MergeResult`); each is imported, with what it needs,
on first use from the `loratool.api` module that defines it. `loratool.api.<command>` is always that
module (`loratool.api.merge` defines `merge` and `MergeResult`).
"""

from __future__ import annotations

__version__ = "0.1.0"

#: Public name -> the `loratool.api` module that defines it.
_API = {
    "CombineResult": "combine", "combine": "combine",
    "ConvertResult": "report", "convert": "convert",
    "ExtractResult": "extract", "extract": "extract",
    "LowRankResult": "report",
    "MergeResult": "merge", "merge": "merge",
    "inspect": "inspect",
    "resize": "resize",
    "svd_extract": "svd_extract",
}

__all__ = sorted([*_API, "__version__"])


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"{__name__}.api.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
