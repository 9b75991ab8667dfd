"""Merge into float8 tensors: W' = Q(deq(W) + Σ ΔW) with a fresh scale per block.

Where every scale covers rows of one chunk (128×128 blocks, per-row scales, plain float8), each chunk of
rows is dequantized, updated (`addmm_`), scaled, rounded and tallied (`quant.report`) in one go, so
memory holds the tensor's stored bytes and one chunk. A per-tensor scale needs the |max| of the whole
sum first: the exact float32 sum of that one tensor is kept while it is rounded, since recomputing it
would cost a second pass of the arithmetic. Updates without factors (DoRA, LoHa, LoKr, full diffs)
and tensors that are not matrices go through `merged_whole`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..checkpoint import Checkpoint
from ..errors import NonFiniteError
from ..lora.delta import COMPUTE_DTYPE
from ..quant import grid_shape
from ..quant.fp8 import STORAGE_DTYPES, block_amax, dequantize, fresh_scale, holds_nan, quantize
from ..quant.report import RoundingFigure, RoundingTally

#: Bytes of float32 rows worked on at a time; each step holds a few such buffers (base, sum, rounding).
CHUNK_BYTES = 8 << 20
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
    matrix = len(shape) == 2 and terms is not None
    chunks = _chunks(shape, target.block) if matrix else [(0, shape[0] if shape else 1)]
    values = torch.empty(shape, dtype=STORAGE_DTYPES[target.storage], device=device)
    scale = None if target.scale_dtype is None else \
        torch.empty(grid_shape(shape, target.block), dtype=target.scale_dtype, device=device)
    tally = RoundingTally() if terms != [] else None
    if matrix and (target.block is not None or scale is None):
        # every scale covers rows of one chunk only: each chunk is summed, scaled and rounded in one go
        for start, stop in chunks:
            base = source.rows(start, stop)
            exact = _with_terms(base, terms, start, keep=tally is not None)
            _round(exact, _scale_rows(scale, start, stop, target.block), target, name, allow_nonfinite,
                   values[start:stop], base, tally)
    else:
        exact = _exact_whole(source, terms, merged_whole, chunks) if matrix else \
            (merged_whole or (lambda x: x))(source.whole())
        _fill_scale(exact, scale, target, name, allow_nonfinite)
        base_as_stored = _as_quantized(source, chunks, target) if tally is not None else None
        for start, stop in chunks:
            _round(exact[start:stop] if shape else exact, _scale_rows(scale, start, stop, target.block), target,
                   name, allow_nonfinite, values[start:stop] if shape else values,
                   base_as_stored(start, stop) if base_as_stored is not None else None, tally, fresh=False)
    figure = tally.figure(name, target.description) if tally is not None else None
    return values.cpu(), scale.reshape(target.scale_shape).cpu() if scale is not None else None, figure


def _as_quantized(source: _Source, chunks: list[tuple[int, int]], target: Fp8Target):
    """Rows of the base as the report compares with: as stored when it is float8 already; a plain base
    (`--dtype float8_e4m3fn`) quantized on its own, so that "survived" compares Q(W+ΔW) with Q(W), not
    with W, whose own rounding is no part of what the adapter lost."""
    if source.encoding is not None:
        return source.rows
    if target.scale_dtype is None:
        return lambda start, stop: dequantize(quantize(source.rows(start, stop), None, None, target.storage), None, None)
    amax = torch.stack([block_amax(source.rows(start, stop), None) for start, stop in chunks]).amax()
    scale = fresh_scale(amax, target.storage, target.scale_dtype)
    return lambda start, stop: dequantize(quantize(source.rows(start, stop), scale, None, target.storage), scale, None)


def _with_terms(rows: torch.Tensor, terms: list[Term], start: int, keep: bool = False) -> torch.Tensor:
    """rows + Σ alpha·left@right over the rows [start, start + len) of the matrix: in place, or with
    `keep` into a new tensor that leaves `rows` as it was."""
    out = rows.clone() if keep else rows
    stop = start + rows.shape[0]
    for left, right, alpha, offset in terms:
        low, high = max(start, offset), min(stop, offset + left.shape[0])
        if low < high:
            out[low - start:high - start].addmm_(left[low - offset:high - offset], right, alpha=alpha)
    return out


def _exact_whole(source: _Source, terms: list[Term] | None, merged_whole, chunks) -> torch.Tensor:
    if terms is None:
        return merged_whole(source.rows(0, source.shape[0]))
    exact = torch.empty(source.shape, dtype=COMPUTE_DTYPE, device=source.device)
    for start, stop in chunks:
        exact[start:stop] = source.rows(start, stop)
        _with_terms(exact[start:stop], terms, start)
    return exact


def _fill_scale(exact: torch.Tensor, scale: torch.Tensor | None, target: Fp8Target, name: str,
                allow_nonfinite: bool) -> None:
    """The fresh scale(s) of `exact` into `scale` (a view of the whole grid, or its rows)."""
    amax = block_amax(exact, target.block)
    if not allow_nonfinite and not math.isfinite(float(amax.max())):
        raise _nonfinite(name)
    if scale is not None:
        scale.copy_(fresh_scale(amax, target.storage, scale.dtype).reshape(scale.shape))


def _nonfinite(name: str) -> NonFiniteError:
    return NonFiniteError(f"merged {name} holds NaN/Inf; check the adapter, or --allow-nonfinite to write it anyway")


def _round(exact: torch.Tensor, scale: torch.Tensor | None, target: Fp8Target, name: str, allow_nonfinite: bool,
           into: torch.Tensor, base: torch.Tensor | None, tally: RoundingTally | None, fresh: bool = True) -> None:
    """Round `exact` into `into` under `scale` (filled from `exact` first when `fresh`), tallying."""
    if fresh:
        _fill_scale(exact, scale, target, name, allow_nonfinite)
    elif scale is None and not allow_nonfinite and not bool(torch.isfinite(exact).all()):
        raise _nonfinite(name)
    stored = quantize(exact, scale, target.block, target.storage)
    into.copy_(stored.reshape(into.shape))
    if tally is not None:
        # finite sums round to finite codes; only --allow-nonfinite can have written a NaN
        tally.add(base, exact, dequantize(stored, scale, target.block, None if allow_nonfinite else True))


def _chunks(shape: tuple[int, ...], block: tuple[int, int] | None) -> list[tuple[int, int]]:
    """Row ranges of a matrix, each starting on a block boundary (one range for other shapes)."""
    if len(shape) != 2:
        return [(0, shape[0] if shape else 1)]
    rows, cols = shape
    step = max(1, CHUNK_BYTES // (4 * max(1, cols)))
    if block is not None:
        step = max(block[0], step // block[0] * block[0])
    return [(start, min(start + step, rows)) for start in range(0, rows, step)] or [(0, 0)]


def _scale_rows(scale: torch.Tensor | None, start: int, stop: int,
                block: tuple[int, int] | None) -> torch.Tensor | None:
    """The scales of rows [start, stop) of a matrix (the grid rows they fall in); others use all scales."""
    if scale is None or block is None or scale.dim() != 2:
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
            self.nan_free = not holds_nan(self.stored)
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
            return dequantize(self.stored, self.scale, block, self.nan_free)
        if self.scale is None or block is None:
            return dequantize(self.stored[start:stop], self.scale, block, self.nan_free)
        first = start // block[0] * block[0]
        rows = dequantize(self.stored[first:stop], _scale_rows(self.scale, start, stop, block), block, self.nan_free)
        return rows[start - first:]
