"""LyCORIS' weight decomposition (DoRA, `.dora_scale`) as a pure function on tensors.

LyCORIS normalises V = W + ΔW either per output unit (`wd_on_out=True`, the default since 2.x, a
dora_scale of shape (out, 1, …)) or per input channel (older files and `wd_on_out=False`, shape
(1, in, 1, …), the norm then taken over the output and kernel axes). The file does not say which, so
the axis is read off the shapes: output axis when dora_scale.shape[0] == W.shape[0] and it holds one
value per output unit, otherwise the input axis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import MismatchError

if TYPE_CHECKING:
    import torch

OUT, IN = "out", "in"


def dora_axis(dora_scale: torch.Tensor, weight_shape) -> str:
    """"out" or "in": the axis of W that `dora_scale` holds one magnitude per entry of."""
    out = weight_shape[0]
    if dora_scale.dim() > 0 and dora_scale.shape[0] == out and dora_scale.numel() == out:
        return OUT
    if len(weight_shape) > 1 and dora_scale.numel() == weight_shape[1]:
        return IN
    raise MismatchError(f"dora_scale {list(dora_scale.shape)} has neither one value per output unit nor one per "
                        f"input channel of a weight {list(weight_shape)}")


def lycoris_dora_factor(base: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """dora_scale / ‖base + delta‖ along LyCORIS' axis, shaped to broadcast over `base` (see module doc).

    Computed in float32 or the widest input dtype; `delta` may be in a flattened layout of base's shape.
    LyCORIS adds the dtype's epsilon to ‖V‖; that is below float32 rounding for any non-degenerate
    weight, so it is left out here, as PEFT's DoRA leaves it out.
    """
    import torch

    dtype = torch.promote_types(torch.promote_types(base.dtype, delta.dtype), torch.float32)
    V = base.to(dtype) + delta.to(device=base.device, dtype=dtype).reshape(base.shape)
    magnitude = dora_scale.to(device=base.device, dtype=dtype).reshape(-1)
    ones = [1] * (V.dim() - 1)
    if dora_axis(dora_scale, base.shape) == OUT:
        norm = torch.linalg.vector_norm(V.reshape(V.shape[0], -1), dim=1)
        return (magnitude / norm).reshape(-1, *ones)
    norm = torch.linalg.vector_norm(V.transpose(0, 1).reshape(V.shape[1], -1), dim=1)
    return (magnitude / norm).reshape(1, -1, *ones[1:])


def apply_lycoris_dora(base: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """W' = V · dora_scale / ‖V‖ with V = base + delta, the norm along LyCORIS' axis."""
    factor = lycoris_dora_factor(base, delta, dora_scale)
    return (base.to(factor.dtype) + delta.to(device=base.device, dtype=factor.dtype).reshape(base.shape)) * factor
