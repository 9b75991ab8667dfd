"""loratool: inspect, merge, convert, extract, resize and combine LoRA adapters and model checkpoints."""

__version__ = "0.1.0"

from .api import (CombineResult, ConvertResult, ExtractResult, LowRankResult, MergeResult, combine,  # noqa: E402
                  convert, extract, inspect, merge, resize, svd_extract)

__all__ = [
    "CombineResult", "ConvertResult", "ExtractResult", "LowRankResult", "MergeResult", "__version__", "combine",
    "convert", "extract", "inspect", "merge", "resize", "svd_extract",
]
