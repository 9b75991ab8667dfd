"""loratool: inspect, merge and convert LoRA adapters and model checkpoints."""

__version__ = "0.1.0"

from .api import MergeResult, inspect, merge  # noqa: E402

__all__ = ["MergeResult", "__version__", "inspect", "merge"]
