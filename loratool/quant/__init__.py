"""Quantized encodings of base weights: what they are (torch-free, from headers) and their codecs.

A quantized weight is one logical tensor stored as several physical ones: the low-precision values,
a multiplicative scale per block, and sometimes tensors that ride along (activation scales, ComfyUI's
per-layer JSON). `Encoding` names those parts; `Checkpoint.read` dequantizes through the codec of its
scheme, and `merge` requantizes changed tensors into the same scheme.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


class TensorInfo(Protocol):
    """A physical tensor as a header describes it (`checkpoint.header.TensorInfo` is one)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


#: Schemes: float8 values times a scale per block of the last two dimensions (a plain float8 tensor is
#: the same with no scale), and GGUF's block types.
FP8 = "fp8"
GGUF = "gguf"
#: Kept exactly as stored, never decoded: ComfyUI layers in formats loratool cannot requantize (nvfp4...).
OPAQUE = "opaque"

#: safetensors code of a float8 storage -> its largest finite value, the top of a fresh scale.
FP8_MAX = {"F8_E4M3": 448.0, "F8_E5M2": 57344.0}


@dataclass(frozen=True)
class Encoding:
    """How one logical tensor is stored. `block` is rows × columns of the last two dimensions that one
    scale covers; a per-tensor scale covers the whole matrix."""

    scheme: str
    #: The stored type: a safetensors float8 code, or a GGUF type name ("Q4_K").
    storage: str
    data: TensorInfo
    scale: TensorInfo | None = None
    block: tuple[int, int] | None = None
    #: Physical tensors carried unchanged while the encoding is kept (activation scales, comfy_quant).
    extras: tuple[TensorInfo, ...] = ()
    #: Where the convention comes from, for `inspect` and messages: "comfy-scaled", "comfy-quant",
    #: "block-scaled", "per-tensor", "plain", or the GGUF architecture.
    form: str = ""

    @property
    def parts(self) -> tuple[TensorInfo, ...]:
        """The physical tensors, in the order they are written."""
        return (self.data,) + ((self.scale,) if self.scale is not None else ()) + self.extras

    @property
    def stored_bytes(self) -> int:
        return sum(part.nbytes for part in self.parts)

    def describe(self) -> str:
        """"FP8 e4m3 per-tensor scaled", "FP8 e4m3 block 128×128", "Q4_K"..."""
        if self.scheme == GGUF:
            return self.storage
        if self.scheme == OPAQUE:
            return f"{self.storage} (ComfyUI, kept as stored)"
        name = {"F8_E4M3": "FP8 e4m3", "F8_E5M2": "FP8 e5m2"}[self.storage]
        if self.scale is None:
            return name
        if math.prod(self.scale.shape) == 1:
            return f"{name} per-tensor scaled"
        rows, cols = self.block or (0, 0)
        return f"{name} per-row scaled" if rows == 1 else f"{name} block {rows}×{cols}"


def is_opaque(info) -> bool:
    """Whether a logical tensor is kept exactly as stored and can be neither read nor requantized."""
    return info.encoding is not None and info.encoding.scheme == OPAQUE


def grid_shape(shape: tuple[int, ...], block: tuple[int, int] | None) -> tuple[int, ...]:
    """The shape of the scale grid for a tensor of `shape` (no dimensions: one scale)."""
    if block is None:
        return ()
    *lead, rows, cols = shape if len(shape) >= 2 else (1, *shape) if shape else (1, 1)
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))
