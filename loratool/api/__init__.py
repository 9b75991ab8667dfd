"""The Python API: one function per command."""

from .combine import CombineResult, combine
from .inspect import inspect
from .merge import MergeResult, merge
from .resize import resize
from .report import LowRankResult
from .svd_extract import svd_extract

__all__ = ["CombineResult", "LowRankResult", "MergeResult", "combine", "inspect", "merge", "resize", "svd_extract"]
