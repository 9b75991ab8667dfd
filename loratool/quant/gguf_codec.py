"""GGUF block types: dequantize and requantize one tensor through the `gguf` package.

The package dequantizes every common type (the K- and I-quants included) but quantizes only some of
them (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and a few more in 0.19); K-quants need ggml's own
quantizer, which is C. A changed tensor whose type the package cannot write becomes Q8_0, the
nearest more precise type it writes, and the caller is told. Which types it reads and writes is asked
of the installed package (one block each, once), not listed here, so an upgrade widens both.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from . import Encoding

if TYPE_CHECKING:
    import numpy as np
    import torch

#: What a changed tensor becomes when the package cannot write its own type.
FALLBACK = "Q8_0"
FLOAT_TYPES = ("F32", "F16", "BF16")


def _gguf():
    from ..gguf_file import import_gguf

    return import_gguf()


def block_size(type_name: str) -> int:
    """Values per block along a row (1 for the float types)."""
    gguf = _gguf()
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0]


def can_read(type_name: str) -> bool:
    """Whether `gguf.quants.dequantize` handles the type."""
    return _package_handles(type_name, write=False)


def can_write(type_name: str) -> bool:
    """Whether `gguf.quants.quantize` writes the type."""
    return _package_handles(type_name, write=True)


@lru_cache(maxsize=None)
def _package_handles(type_name: str, write: bool) -> bool:
    """Tried on one block of zeros: the package raises NotImplementedError for the types it lacks."""
    import numpy as np

    gguf = _gguf()
    kind = getattr(gguf.GGMLQuantizationType, type_name, None)
    if kind is None:
        return False
    values_per_block, bytes_per_block = gguf.GGML_QUANT_SIZES[kind]
    try:
        if write:
            gguf.quants.quantize(np.zeros((1, values_per_block), dtype=np.float32), kind)
        else:
            gguf.quants.dequantize(np.zeros((1, bytes_per_block), dtype=np.uint8), kind)
    except NotImplementedError:
        return False
    return True


def dequantize_tensor(encoding: Encoding, raw: torch.Tensor) -> torch.Tensor:
    """float32 values of one GGUF tensor, in torch order, from its stored bytes (uint8, one row of
    bytes per row of the tensor)."""
    import torch

    values = dequantize_bytes(raw.numpy(), encoding.storage)
    return torch.from_numpy(values)


#: Values dequantized at once: the package's K-quant decoders hold several temporaries of the block's
#: size, so a whole 4096×4096 tensor would cost a few hundred MB more than its float32 values.
CHUNK_VALUES = 1 << 20


def dequantize_bytes(raw: np.ndarray, type_name: str) -> np.ndarray:
    """float32 values of stored bytes (last dimension: bytes of one row), a block of rows at a time, in
    memory of their own: the package returns F32 as a view of the bytes, and callers update values in
    place (the rounding tally uses up what it is given)."""
    import numpy as np

    gguf = _gguf()
    kind = gguf.GGMLQuantizationType[type_name]
    block, type_size = gguf.GGML_QUANT_SIZES[kind]
    row_values = raw.shape[-1] // type_size * block if raw.ndim else 0
    if raw.ndim < 2 or raw.size // type_size * block <= CHUNK_VALUES:
        values = np.ascontiguousarray(gguf.quants.dequantize(raw, kind), dtype=np.float32)
        return values.copy() if np.shares_memory(values, raw) else values
    rows = raw.reshape(-1, raw.shape[-1])
    out = np.empty((rows.shape[0], row_values), dtype=np.float32)
    step = max(1, CHUNK_VALUES // row_values)
    for start in range(0, rows.shape[0], step):
        out[start:start + step] = gguf.quants.dequantize(rows[start:start + step], kind)
    return out.reshape(*raw.shape[:-1], row_values)


def target_type(type_name: str, row: int) -> tuple[str, str | None]:
    """(the type a tensor asked to be `type_name` is written as, a note or None): the type itself where
    the package writes it, else Q8_0; a row length that is not a multiple of that type's block stays in
    a float type (F32 when asked for F32, else F16), as llama.cpp keeps such tensors."""
    chosen, note = type_name, None
    if not can_write(chosen):
        chosen, note = FALLBACK, f"the gguf package cannot write {type_name}; stored as {FALLBACK}"
    if row % block_size(chosen):
        fallback = "F32" if type_name == "F32" else "F16"
        note = f"rows of {row} values do not fill {chosen} blocks of {block_size(chosen)}; stored as {fallback}"
        chosen = fallback
    return chosen, note


def stored_nbytes(shape: tuple[int, ...], type_name: str) -> int:
    """Bytes of a tensor of `shape` (torch order) stored as `type_name`."""
    import math

    gguf = _gguf()
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return math.prod(shape) // block * type_size


def requantize(values: np.ndarray | torch.Tensor, type_name: str) -> tuple[np.ndarray, str, str | None]:
    """(stored bytes as uint8, the type written, a note or None) for float32 `values` asked to be stored
    as `type_name` (see `target_type`)."""
    import numpy as np

    gguf = _gguf()
    if not isinstance(values, np.ndarray):
        values = values.detach().float().cpu().numpy()
    values = np.ascontiguousarray(values, dtype=np.float32)
    chosen, note = target_type(type_name, values.shape[-1] if values.ndim else 1)
    data = gguf.quants.quantize(values, gguf.GGMLQuantizationType[chosen])
    return np.ascontiguousarray(data).view(np.uint8), chosen, note
