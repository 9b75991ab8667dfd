"""The Python API: one function per command."""

from .inspect import inspect
from .merge import MergeResult, merge

__all__ = ["MergeResult", "inspect", "merge"]
