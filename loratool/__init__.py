"""loratool: inspect, merge, extract, resize and combine LoRA adapters and model checkpoints."""

__version__ = "0.1.0"

from .api import CombineResult, LowRankResult, MergeResult, combine, inspect, merge, resize, svd_extract  # noqa: E402

__all__ = [
    "CombineResult", "LowRankResult", "MergeResult", "__version__", "combine", "inspect", "merge", "resize",
    "svd_extract",
]
