"""The Python API: one function per command."""

from .combine import CombineResult, combine
from .convert import ConvertResult, convert
from .extract import ExtractResult, extract
from .inspect import inspect
from .merge import MergeResult, merge
from .resize import resize
from .report import LowRankResult
from .svd_extract import svd_extract

__all__ = [
    "CombineResult", "ConvertResult", "ExtractResult", "LowRankResult", "MergeResult", "combine", "convert", "extract",
    "inspect", "merge", "resize", "svd_extract",
]
