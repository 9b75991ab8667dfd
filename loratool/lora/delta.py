"""ΔW per layer kind, and DoRA, as pure functions on tensors. All arithmetic is float32 or wider.

Every kind reduces to one matrix product in the base weight's own layout: ΔW2d = s · left @ right,
where ΔW2d is the base weight viewed as 2-D (conv kernels flattened into columns). That lets merge add
the update with `addmm_` a block of rows at a time and never materialise ΔW for plain LoRA.
"""

from __future__ import annotations

import math

import torch

from .module import LayerKind, LoraModule

COMPUTE_DTYPE = torch.float32


def expected_base_shape(module: LoraModule, transposed: bool = False) -> tuple[int, ...]:
    """The base weight shape the module fits; `transposed` is HF `Conv1D` storage, (in, out)."""
    return module.expected_base_shape(transposed)


def norm_over_rows(module: LoraModule, transposed: bool) -> bool:
    """True when the 2-D view's rows are output units (DoRA norms each row); False when columns are."""
    return not (transposed or module.kind is LayerKind.EMBEDDING)


def delta_factors(module: LoraModule, transposed: bool = False, device: torch.device | str = "cpu"):
    """(left, right) in float32 with ΔW2d = scale · left @ right in the base layout."""
    A = module.lora_A.to(device=device, dtype=COMPUTE_DTYPE)
    B = module.lora_B.to(device=device, dtype=COMPUTE_DTYPE)
    if module.kind is LayerKind.CONV:
        return B.reshape(B.shape[0], -1), A.reshape(A.shape[0], -1)
    if module.kind is LayerKind.EMBEDDING or transposed:
        return A.T, B.T
    return B, A


def as_2d(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1) if weight.dim() != 2 else weight


def delta_weight(module: LoraModule, transposed: bool = False, device: torch.device | str = "cpu") -> torch.Tensor:
    """ΔW = s·B@A in the base weight's shape, float32."""
    left, right = delta_factors(module, transposed, device)
    return (module.scale * (left @ right)).reshape(expected_base_shape(module, transposed))


def apply_dora_(acc: torch.Tensor, base: torch.Tensor, module: LoraModule, transposed: bool = False) -> None:
    """acc ← (m / ‖base + ΔW‖) ⊙ (acc + ΔW), in place.

    The norm is taken per output unit of the *unmerged* base (as PEFT's forward and merge do), so when
    several adapters merge in turn, earlier ones do not leak into a later DoRA's norm.
    """
    delta = delta_weight(module, transposed, acc.device)
    rows = norm_over_rows(module, transposed)
    norm = torch.linalg.vector_norm(as_2d(base + delta), dim=1 if rows else 0)
    factor = module.magnitude.to(device=acc.device, dtype=COMPUTE_DTYPE).reshape(-1) / norm
    acc2d = as_2d(acc)
    acc2d.add_(as_2d(delta)).mul_(factor.unsqueeze(1) if rows else factor.unsqueeze(0))


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
