"""Options every command that computes shares, checked once: the device and the per-adapter weights.
(The CLI's parameter types parse them from text; these check the values the API receives.)"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .errors import NonFiniteError, UsageError, summarize

if TYPE_CHECKING:
    import torch

    from .lora.module import Adapter


def resolve_device(device: str) -> torch.device:
    """`auto` (CUDA when torch sees one), `cpu` or `cuda`; asking for CUDA without one is a usage error."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


def parse_weights(weights: list[float] | None, count: int) -> list[float]:
    """One finite weight per adapter (all 1 when none are given)."""
    if weights is None:
        return [1.0] * count
    if len(weights) != count:
        raise UsageError(f"--weights has {len(weights)} values for {count} adapter(s); give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise UsageError(f"--weights must be finite numbers, got {weights}")
    return [float(w) for w in weights]


def check_finite(adapters: list[Adapter], remedy: str | None = "pass --allow-nonfinite to merge anyway") -> None:
    """Refuse adapters holding NaN/Inf in any floating tensor, naming every such tensor (and `remedy`,
    for the one command that has an override)."""
    import torch

    bad = [
        f"{adapter.path}: {name}"
        for adapter in adapters
        for name, tensor in adapter.named_tensors().items()
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if bad:
        raise NonFiniteError(f"NaN/Inf in adapter tensors: {summarize(bad)}" + (f"; {remedy}" if remedy else ""))
