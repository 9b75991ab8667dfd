"""Merge into float8 tensors: W' = Q(deq(W) + Σ ΔW) with a fresh scale per block.

The exact float32 sum of one tensor is built a chunk of rows at a time (base rows dequantized, factored
updates added with `addmm_`), its blocks' |max| fix the new scales, and it is then rounded a chunk at a
time while the rounding is tallied (`quant.report`). Memory holds one tensor's float32 sum and its
stored bytes: the sum cannot be rounded before every value of a block is known, and recomputing it
instead would cost a second pass of the arithmetic. Updates without factors (DoRA, LoHa, LoKr, full
diffs) and tensors that are not matrices go through `merged_whole`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..checkpoint import Checkpoint
from ..errors import NonFiniteError
from ..lora.delta import COMPUTE_DTYPE, add_deltas_blockwise
from ..quant import grid_shape
from ..quant.fp8 import STORAGE_DTYPES, block_amax, dequantize, fresh_scale, quantize
from ..quant.report import RoundingFigure, RoundingTally

#: Rows of float32 sum computed at a time.
CHUNK_BYTES = 16 << 20
#: A term as merge streams it: alpha·left@right added from row `offset` of the 2-D view.
Term = tuple[torch.Tensor, torch.Tensor, float, int]


@dataclass(frozen=True)
class NewFp8:
    """What `--dtype float8_e4m3fn` writes for a plain matrix: ComfyUI's scaled FP8 form."""

    storage: str = "F8_E4M3"
    dtype: torch.dtype = torch.float8_e4m3fn
    scale_name: str = "scale_weight"
    scale_dtype: torch.dtype = torch.float32


NEW_FP8 = NewFp8()


@dataclass(frozen=True)
class Fp8Target:
    """The encoding a tensor is written in: float8 `storage`, one scale per `block` (None: per tensor)."""

    storage: str
    block: tuple[int, int] | None
    #: None for plain float8, which has no scale: values are rounded as they are.
    scale_dtype: torch.dtype | None
    scale_shape: tuple[int, ...]
    description: str

    @classmethod
    def of(cls, info) -> Fp8Target:
        """The target that keeps a tensor's own encoding, or (a plain float) makes it scaled FP8."""
        encoding = info.encoding
        if encoding is None:
            return cls(NEW_FP8.storage, None, NEW_FP8.scale_dtype, (), "FP8 e4m3 per-tensor scaled")
        scale = encoding.scale
        return cls(encoding.storage, encoding.block, scale.torch_dtype if scale is not None else None,
                   tuple(scale.shape) if scale is not None else (), encoding.describe())


def requantize(checkpoint: Checkpoint, name: str, target: Fp8Target, terms: list[Term] | None,
               merged_whole: Callable[[torch.Tensor], torch.Tensor] | None, device: torch.device,
               allow_nonfinite: bool) -> tuple[torch.Tensor, torch.Tensor | None, RoundingFigure | None]:
    """(float8 values, scale, figure) for one tensor. `terms` (factored updates) are added to the base
    a chunk of rows at a time; without them `merged_whole(base float32) -> float32` gives the sum.
    With no update at all (terms == []) the base is quantized as it is, and there is no figure."""
    source = _Source(checkpoint, name, device)
    shape = source.shape
    chunks = _chunks(shape, target.block)
    if terms is None or len(shape) != 2:
        exact = merged_whole(source.rows(0, shape[0]) if shape else source.whole()) if merged_whole is not None \
            else source.rows(0, shape[0]) if shape else source.whole()
        if terms:
            exact = _apply(exact, terms)
    else:
        exact = torch.empty(shape, dtype=COMPUTE_DTYPE, device=device)
        for start, stop in chunks:
            add_deltas_blockwise(source.rows(start, stop), exact[start:stop],
                                 [(left, right, alpha, offset - start) for left, right, alpha, offset in terms])
    amax = block_amax(exact, target.block)
    if not allow_nonfinite and not math.isfinite(float(amax.max())):
        raise NonFiniteError(f"merged {name} holds NaN/Inf; check the adapter, or --allow-nonfinite to write it anyway")
    scale = fresh_scale(amax, target.storage, target.scale_dtype) if target.scale_dtype is not None else None
    values = torch.empty(shape, dtype=STORAGE_DTYPES[target.storage], device=device)
    tally = RoundingTally() if terms != [] else None
    for start, stop in chunks:
        rows = exact[start:stop] if len(shape) == 2 else exact
        rows_scale = _scale_rows(scale, start, stop, target.block) if len(shape) == 2 and scale is not None else scale
        stored = quantize(rows, rows_scale, target.block, target.storage)
        if len(shape) == 2:
            values[start:stop] = stored
        else:
            values.copy_(stored)
        if tally is not None:
            base = source.rows(start, stop) if len(shape) == 2 else source.whole()
            tally.add(base, rows, dequantize(stored, rows_scale, target.block))
    figure = tally.figure(name, target.description) if tally is not None else None
    return values.cpu(), scale.reshape(target.scale_shape).cpu() if scale is not None else None, figure


def _apply(base: torch.Tensor, terms: list[Term]) -> torch.Tensor:
    out = torch.empty_like(base)
    add_deltas_blockwise(base, out, terms)
    return out


def _chunks(shape: tuple[int, ...], block: tuple[int, int] | None) -> list[tuple[int, int]]:
    """Row ranges of a matrix, each starting on a block boundary (one range for other shapes)."""
    if len(shape) != 2:
        return [(0, shape[0] if shape else 1)]
    rows, cols = shape
    step = max(1, CHUNK_BYTES // (4 * max(1, cols)))
    if block is not None:
        step = max(block[0], step // block[0] * block[0])
    return [(start, min(start + step, rows)) for start in range(0, rows, step)] or [(0, 0)]


def _scale_rows(scale: torch.Tensor, start: int, stop: int, block: tuple[int, int] | None) -> torch.Tensor:
    """The scales of rows [start, stop) of a matrix (the grid rows they fall in); others use all scales."""
    if block is None or scale.dim() != 2:
        return scale
    return scale[start // block[0]: math.ceil(stop / block[0])]


class _Source:
    """The base tensor's float32 rows: dequantized from its stored parts (read once), or read as rows."""

    def __init__(self, checkpoint: Checkpoint, name: str, device: torch.device):
        self.checkpoint, self.name, self.device = checkpoint, name, device
        info = checkpoint[name]
        self.encoding = info.encoding
        self.shape = tuple(info.shape)
        if self.encoding is not None:
            self.stored = checkpoint.read_stored(self.encoding.data).to(device)
            self.scale = None
            if self.encoding.scale is not None:
                scale = checkpoint.read_stored(self.encoding.scale).to(device)
                self.scale = scale.reshape(grid_shape(self.shape, self.encoding.block))

    def whole(self) -> torch.Tensor:
        return self.checkpoint.read(self.name).to(device=self.device, dtype=COMPUTE_DTYPE)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if self.encoding is None:
            if not self.shape:
                return self.whole()
            return self.checkpoint.read_rows(self.name, start, stop).to(device=self.device, dtype=COMPUTE_DTYPE)
        block = self.encoding.block
        if len(self.shape) != 2:
            return dequantize(self.stored, self.scale, block)
        if self.scale is None or block is None:
            return dequantize(self.stored[start:stop], self.scale, block)
        first = start // block[0] * block[0]
        rows = dequantize(self.stored[first:stop], _scale_rows(self.scale, start, stop, block), block)
        return rows[start - first:]
