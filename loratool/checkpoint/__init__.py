"""Checkpoint I/O: validated lazy reading, streaming sharded writing, atomic outputs."""

from .header import TensorInfo, read_header
from .reader import Checkpoint, open_checkpoint

__all__ = ["Checkpoint", "TensorInfo", "open_checkpoint", "read_header"]
