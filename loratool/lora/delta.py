"""The streamed merge arithmetic as pure functions on tensors. All arithmetic is float32 or wider.

A factored module (`AdapterModule.factors`) reduces to one matrix product in the base weight's own
layout: ΔW2d = s · left @ right, where ΔW2d is the base weight viewed as 2-D (conv kernels flattened
into columns). That lets merge add the update with `addmm_` a block of rows at a time and never
materialise ΔW.
"""

from __future__ import annotations

import math

import torch

COMPUTE_DTYPE = torch.float32


def as_2d(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1) if weight.dim() != 2 else weight


def add_deltas_blockwise(
    weight: torch.Tensor, out: torch.Tensor, terms: list[tuple[torch.Tensor, torch.Tensor, float, int]],
    block_elements: int = 1 << 18, scratch: torch.Tensor | None = None,
) -> tuple[float, float]:
    """out = round(weight + Σ alpha·left@right), a block of rows at a time; returns (min, max) of the
    float32 result (NaN if any NaN), so callers check finiteness without another pass over memory.
    Each term's `left` covers the rows from its offset on (a q/k/v piece of a fused tensor covers a
    third); the offset may be negative when `weight` is a run of rows from inside a larger matrix.

    Each block is widened to float32 into one reused buffer (`scratch`, or one allocated here) small
    enough to stay in cache (1 MB by default), updated with `addmm_`, rounded once into `out`, and
    scanned for its range while still in cache. `out` may be `weight` itself. With no terms it is a
    checked cast.
    """
    w2, o2 = as_2d(weight), as_2d(out)
    if w2.shape[0] == 0 or w2.shape[1] == 0:
        return 0.0, 0.0
    rows = max(1, min(w2.shape[0], block_elements // max(1, w2.shape[1])))
    if scratch is None or scratch.numel() < rows * w2.shape[1] or scratch.device != w2.device:
        scratch = torch.empty(rows * w2.shape[1], dtype=COMPUTE_DTYPE, device=w2.device)
    low, high, saw_nan = math.inf, -math.inf, False
    for start in range(0, w2.shape[0], rows):
        stop = min(start + rows, w2.shape[0])
        acc = scratch[: (stop - start) * w2.shape[1]].view(stop - start, w2.shape[1])
        acc.copy_(w2[start:stop])
        for left, right, alpha, offset in terms:
            low_row, high_row = max(start, offset), min(stop, offset + left.shape[0])
            if low_row < high_row:
                acc[low_row - start:high_row - start].addmm_(left[low_row - offset:high_row - offset], right,
                                                             alpha=alpha)
        o2[start:stop].copy_(acc)
        block_low, block_high = (v.item() for v in torch.aminmax(acc))
        saw_nan = saw_nan or math.isnan(block_low) or math.isnan(block_high)
        low, high = min(low, block_low), max(high, block_high)
    return (math.nan, math.nan) if saw_nan else (low, high)
