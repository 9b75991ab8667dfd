"""loratool: inspect, merge, extract and resize LoRA adapters and model checkpoints."""

__version__ = "0.1.0"

from .api import LowRankResult, MergeResult, inspect, merge, resize, svd_extract  # noqa: E402

__all__ = ["LowRankResult", "MergeResult", "__version__", "inspect", "merge", "resize", "svd_extract"]
