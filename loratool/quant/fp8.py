"""Float8 with a multiplicative scale per block: the one codec behind ComfyUI's scaled FP8 files (a
scale per tensor), HF's block-scaled checkpoints (a scale per 128×128 block), per-row scales, and
plain float8 (no scale).

The real value is `stored.float() * scale` of the block it sits in. A fresh scale is the block's
|max| / the format's largest value, so the block fills the format's range; values are then rounded
to nearest (ties to even) and saturated at ±max, which float8_e4m3fn cannot represent beyond.
`block` is rows × columns of the last two dimensions one scale covers; None is one scale for all.
Matrices take a broadcasting path (no full-size scale tensor is ever built); other shapes expand.
"""

from __future__ import annotations

import torch

from . import FP8_MAX, grid_shape

STORAGE_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def expand(scale: torch.Tensor, shape: tuple[int, ...], block: tuple[int, int] | None) -> torch.Tensor:
    """The scale of every element: each block's scale repeated over its block, cropped at the edges."""
    scale = scale.to(torch.float32)
    if block is None:
        return scale.reshape(())
    grid = scale.reshape(grid_shape(shape, block))
    full = grid.repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    rows, cols = (shape[-2], shape[-1]) if len(shape) >= 2 else (1, shape[-1] if shape else 1)
    return full[..., :rows, :cols].reshape(shape)


def _column_groups(matrix: torch.Tensor, width: int):
    """(view of full column blocks as (rows, blocks, width), ragged last columns or None)."""
    rows, cols = matrix.shape
    full = cols // width * width
    body = matrix[:, :full].view(rows, cols // width, width) if full else None
    return body, (matrix[:, full:] if full < cols else None)


def _scale_in_place(matrix: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], divide: bool,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """matrix × (or /) its blocks' scales, broadcasting a (rows, grid columns) scale over each block;
    into `out` (same shape, float32) when given, else in place."""
    out = matrix if out is None else out
    per_row = scale.to(torch.float32).repeat_interleave(block[0], dim=0)[: matrix.shape[0]]
    (body, tail), (out_body, out_tail) = _column_groups(matrix, block[1]), _column_groups(out, block[1])
    op = torch.div if divide else torch.mul
    if body is not None:
        op(body, per_row[:, : body.shape[1], None], out=out_body)
    if tail is not None:
        op(tail, per_row[:, -1:], out=out_tail)
    return out


def holds_nan(values: torch.Tensor) -> bool:
    """Whether a float8 tensor holds a NaN code (e4m3fn has only S.1111.111; e5m2's widen exactly)."""
    if values.dtype != torch.float8_e4m3fn:
        return False
    magnitude = values.view(torch.uint8).bitwise_and(0x7F)
    return bool(magnitude.eq_(0x7F).any())


def _widened(values: torch.Tensor, nan_free: bool | None) -> tuple[torch.Tensor, float]:
    """(wider, factor) with values == wider × factor exactly. torch's own float8 -> float32 cast is a slow
    scalar loop on CPU; float8 bits placed into float16 bits (e5m2 is float16's top byte; e4m3fn's
    exponent and mantissa fit float16's, off by 2⁸, subnormals included) are vectorised integer ops.
    e4m3fn's NaN code has no float16 twin, so a tensor holding one takes the slow cast (`nan_free`
    says so when the caller knows, else it is checked)."""
    if values.device.type != "cpu":
        return values.to(torch.float32), 1.0
    if values.dtype == torch.float8_e5m2:
        return values.view(torch.uint8).to(torch.int16).bitwise_left_shift_(8).view(torch.float16), 1.0
    signed = values.view(torch.int8)
    if not (nan_free if nan_free is not None else not holds_nan(values)):
        return values.to(torch.float32), 1.0
    wide = signed.to(torch.int16)
    bits = wide.bitwise_and(0x7F).bitwise_left_shift_(7)
    bits.bitwise_or_(wide.bitwise_and_(-(1 << 15)))
    return bits.view(torch.float16), 256.0


def dequantize(values: torch.Tensor, scale: torch.Tensor | None, block: tuple[int, int] | None,
               nan_free: bool | None = None) -> torch.Tensor:
    wide, factor = _widened(values, nan_free)
    if scale is None:
        return wide.to(torch.float32).mul_(factor) if factor != 1.0 else wide.to(torch.float32)
    scale = scale.to(device=values.device, dtype=torch.float32) * factor
    if block is not None and values.dim() == 2:
        out = torch.empty(values.shape, dtype=torch.float32, device=values.device)
        return _scale_in_place(wide, scale.reshape(grid_shape(tuple(values.shape), block)), block, False, out)
    # a 0-dim float32 scale would not promote a float16 tensor: widen first
    return wide.to(torch.float32).mul_(expand(scale, tuple(values.shape), block))


def block_amax(values: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """|max| of each block of a float32 tensor (a 2-D chunk of rows must start on a block boundary)."""
    if block is None:
        return values.abs().amax() if values.numel() else torch.zeros((), device=values.device)
    if values.dim() == 2 and values.numel():
        body, tail = _column_groups(values, block[1])
        parts = ([_abs_max(body, keepdim=False)] if body is not None else []) + \
                ([_abs_max(tail, keepdim=True)] if tail is not None else [])
        per_row = torch.cat(parts, dim=1)
        rows = values.shape[0]
        grid_rows = -(-rows // block[0])
        padded = per_row.new_zeros(grid_rows * block[0], per_row.shape[1])
        padded[:rows] = per_row
        return padded.view(grid_rows, block[0], -1).amax(dim=1)
    shape = tuple(values.shape)
    as_matrix = values.reshape(-1, shape[-2], shape[-1]) if len(shape) >= 2 else values.reshape(1, 1, -1)
    lead, rows, cols = as_matrix.shape
    grid_rows, grid_cols = -(-rows // block[0]), -(-cols // block[1])
    padded = as_matrix.new_zeros(lead, grid_rows * block[0], grid_cols * block[1])
    padded[:, :rows, :cols] = as_matrix.abs()
    blocks = padded.reshape(lead, grid_rows, block[0], grid_cols, block[1])
    return blocks.amax(dim=(2, 4)).reshape(grid_shape(shape, block))


def _abs_max(values: torch.Tensor, keepdim: bool) -> torch.Tensor:
    """|max| over the last dimension, from its max and min: no |values| copy of a large chunk."""
    low, high = torch.aminmax(values, dim=-1, keepdim=keepdim)
    return torch.maximum(high, low.neg_())


def fresh_scale(amax: torch.Tensor, storage: str, scale_dtype: torch.dtype) -> torch.Tensor:
    """amax / max per block, in the stored scale's dtype; an all-zero block gets scale 1."""
    scale = amax.to(torch.float32) / FP8_MAX[storage]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale.to(scale_dtype)


def quantize(values: torch.Tensor, scale: torch.Tensor | None, block: tuple[int, int] | None,
             storage: str) -> torch.Tensor:
    """Round `values` (float32) to float8 under `scale` (already in its stored dtype): nearest, saturating."""
    top = FP8_MAX[storage]
    if scale is None:
        scaled = values.clamp(-top, top)
    elif block is not None and values.dim() == 2:
        scaled = _scale_in_place(values, scale.reshape(grid_shape(tuple(values.shape), block)).to(values.device), block,
                                 divide=True, out=torch.empty_like(values))
        scaled.clamp_(-top, top)
    else:
        scaled = (values / expand(scale, tuple(values.shape), block).to(values.device)).clamp_(-top, top)
    return scaled.to(STORAGE_DTYPES[storage])
