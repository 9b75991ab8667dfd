"""Decode and encode a logical tensor through its encoding's scheme."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import InvalidCheckpointError
from . import FP8, GGUF, OPAQUE, Encoding, TensorInfo


def decode(encoding: Encoding, read_stored: Callable[[TensorInfo], torch.Tensor]) -> torch.Tensor:
    """The float32 values of a quantized tensor, from its physical parts."""
    if encoding.scheme == FP8:
        from .fp8 import dequantize

        scale = read_stored(encoding.scale) if encoding.scale is not None else None
        return dequantize(read_stored(encoding.data), scale, encoding.block)
    if encoding.scheme == GGUF:
        from .gguf_codec import dequantize_tensor

        return dequantize_tensor(encoding, read_stored(encoding.data))
    if encoding.scheme == OPAQUE:
        raise InvalidCheckpointError(f"{encoding.data.name} is stored in ComfyUI's {encoding.storage} format, which "
                                     "loratool copies but cannot dequantize; use the bf16 or FP8 model for this")
    raise ValueError(f"unknown encoding scheme {encoding.scheme!r}")
