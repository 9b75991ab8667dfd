"""A module restricted to one piece of a fused weight: B's rows cut to a range, or its two row
halves swapped. Pure tensor views, so a fused LoRA is split exactly."""

from __future__ import annotations

import dataclasses

import torch

from .module import LoraModule


def _rows(tensor: torch.Tensor | None, rows: tuple[int, int] | None, swap: bool) -> torch.Tensor | None:
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


def restrict(module: LoraModule, name: str, rows: tuple[int, int] | None = None, swap: bool = False) -> LoraModule:
    """`module` as it acts on rows [start, stop) of its output (and/or with its halves swapped), renamed."""
    if rows is None and not swap:
        return dataclasses.replace(module, name=name)
    return dataclasses.replace(module, name=name, lora_B=_rows(module.lora_B, rows, swap).contiguous(),
                               bias=_rows(module.bias, rows, swap), magnitude=_rows(module.magnitude, rows, swap))
