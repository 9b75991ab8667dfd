"""Weight decomposition (DoRA), one helper for PEFT's and LyCORIS' forms, as pure functions on tensors.

W' = (m / ‖V‖) ⊙ V with V = W + ΔW, the norm taken over the unmerged weight plus this module's own
ΔW. PEFT normalises per output unit (`lora_magnitude_vector`, one value per output). LyCORIS' `.dora_scale`
does too with `wd_on_out=True` (the default since 2.x, shape (out, 1, …)), or per input channel
(older files and `wd_on_out=False`, shape (1, in, 1, …), the norm taken over the output and kernel axes).
The file does not say which, so the axis is read off the shapes: the output axis when the magnitude holds
one value per output unit, otherwise the input axis.

Axes are those of the module's logical weight (out, in, k…). A base that stores a matrix transposed
(HF `Conv1D`, and embeddings, whose LoRA update is (B·A)ᵀ) is normalised along the same logical axis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import MismatchError

if TYPE_CHECKING:
    import torch

OUT, IN = "out", "in"


def dora_axis(magnitude: torch.Tensor, weight_shape) -> str:
    """"out" or "in": the axis of the logical weight that `magnitude` holds one value per entry of."""
    out = weight_shape[0]
    if magnitude.dim() > 0 and magnitude.shape[0] == out and magnitude.numel() == out:
        return OUT
    if len(weight_shape) > 1 and magnitude.dim() > 0 and magnitude.numel() == weight_shape[1]:
        return IN
    raise MismatchError(f"dora_scale {list(magnitude.shape)} has neither one value per output unit nor one per "
                        f"input channel of a weight {list(weight_shape)}")


def dora_factor(unmerged: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, axis: str,
                transposed: bool = False) -> torch.Tensor:
    """m / ‖unmerged + delta‖ along `axis`, shaped to broadcast over the stored weight.

    `unmerged` and `delta` are in the stored layout (`transposed`: a matrix stored as (in, out)); the
    result is computed in float32, or wider when an input is. LyCORIS adds the dtype's epsilon to ‖V‖;
    that is below float32 rounding for any non-degenerate weight, so it is left out, as PEFT leaves it out.
    """
    import torch

    dtype = torch.promote_types(torch.promote_types(unmerged.dtype, delta.dtype), torch.float32)
    stored = unmerged.to(dtype) + delta.to(device=unmerged.device, dtype=dtype).reshape(unmerged.shape)
    V = stored.T if transposed and stored.dim() == 2 else stored
    values = magnitude.to(device=unmerged.device, dtype=dtype).reshape(-1)
    ones = [1] * (V.dim() - 1)
    if axis == OUT:
        factor = (values / torch.linalg.vector_norm(V.reshape(V.shape[0], -1), dim=1)).reshape(-1, *ones)
    else:
        norm = torch.linalg.vector_norm(V.transpose(0, 1).reshape(V.shape[1], -1), dim=1)
        factor = (values / norm).reshape(1, -1, *ones[1:])
    return factor.T if transposed and stored.dim() == 2 else factor


def apply_dora_(acc: torch.Tensor, unmerged: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
                axis: str, transposed: bool = False) -> None:
    """acc ← (acc + ΔW) · m / ‖unmerged + ΔW‖, in place, in the stored layout.

    The norm is over the *unmerged* weight (as PEFT's forward and merge and LyCORIS compute it), so when
    several adapters merge in turn, earlier ones do not leak into a later DoRA's norm."""
    factor = dora_factor(unmerged, delta, magnitude, axis, transposed)
    acc.add_(delta.to(acc.dtype).reshape(acc.shape)).mul_(factor.to(acc.dtype))
