"""A module restricted to one piece of a fused weight: B's rows cut to a range, or its two row
halves swapped. Pure tensor views, so a fused LoRA is split exactly."""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING

from ..errors import AdapterError
from .module import LoraModule

if TYPE_CHECKING:
    import torch


def _rows(tensor: torch.Tensor | None, rows: tuple[int, int] | None, swap: bool) -> torch.Tensor | None:
    import torch

    if tensor is None:
        return None
    if rows is not None:
        tensor = tensor[rows[0]:rows[1]]
    if swap:
        half = tensor.shape[0] // 2
        tensor = torch.cat([tensor[half:], tensor[:half]])
    return tensor


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    return _rows(tensor, None, True)


def renamed(module, name: str):
    """A shallow copy of any adapter module under another name (the tensors are shared)."""
    if isinstance(module, LoraModule):
        return dataclasses.replace(module, name=name)
    copied = copy.copy(module)
    copied.name = name
    return copied


def restrict(module: LoraModule, name: str, rows: tuple[int, int] | None = None, swap: bool = False) -> LoraModule:
    """`module` as it acts on rows [start, stop) of its output (and/or with its halves swapped), renamed.

    Only plain LoRA splits into a module of the same algorithm (B's rows); a LoHa or LoKr on a fused
    tensor has no exact per-part factorisation, so it is refused here (merge slices its dense ΔW)."""
    if rows is None and not swap:
        return renamed(module, name)
    if not isinstance(module, LoraModule):
        raise AdapterError(f"{module.name}: a {module.algorithm} module on a fused tensor cannot be split into "
                           f"per-part {module.algorithm} modules for {name}; convert it with --rank to plain LoRA first")
    return dataclasses.replace(module, name=name, lora_B=_rows(module.lora_B, rows, swap).contiguous(),
                               bias=_rows(module.bias, rows, swap), magnitude=_rows(module.magnitude, rows, swap))
