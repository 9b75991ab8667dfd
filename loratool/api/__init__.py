"""The Python API: one function per command, each imported (with torch, where it needs it) on first use.

Most submodules share their function's name (`loratool.api.merge` defines `merge`). As before the
imports became lazy, the package attribute is the function, even after the submodule is imported.
"""

from __future__ import annotations

import importlib
import sys
import types

#: Public name -> the submodule defining it.
_EXPORTS = {
    "CombineResult": "combine", "combine": "combine",
    "ConvertResult": "convert", "convert": "convert",
    "ExtractResult": "extract", "extract": "extract",
    "LowRankResult": "report",
    "MergeResult": "merge", "merge": "merge",
    "inspect": "inspect",
    "resize": "resize",
    "svd_extract": "svd_extract",
}

__all__ = sorted(_EXPORTS)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # The import system sets `loratool.api.merge = <module>` once it has loaded that submodule;
        # keep the function there instead, as the eager `from .merge import merge` used to.
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
