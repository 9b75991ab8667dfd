"""The products LyCORIS builds ΔW from, as pure functions on tensors (no scale applied here).

Each takes the factors as a LyCORIS file stores them and returns the unscaled update in the file's
own layout: a conv kernel may come out flattened to (out, in·kh·kw) when the file stores it that way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def tucker_rebuild(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """W[p, q, k…] = Σᵢⱼ core[i, j, k…]·out_factor[i, p]·in_factor[j, q] (a Tucker-2 / CP conv kernel).

    `core` is (r₁, r₂, kh, kw), `out_factor` (r₁, out), `in_factor` (r₂, in). This is the rebuild of
    LoHa's `hada_t*` halves and LoKr's `lokr_t2`, and (with up/down transposed) LoCon's `lora_mid`.
    """
    import torch

    return torch.einsum("ij...,ip,jq->pq...", core, out_factor, in_factor)


def tucker_to_flat(core: torch.Tensor, out_factor: torch.Tensor,
                   in_factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(left (out, r₁), right (r₁, in·kh·kw)) with left @ right = the flattened Tucker rebuild, exactly.

    The rebuild has rank ≤ r₁ once the kernel is flattened into columns, so a Tucker half converts to
    the flat factor pair of the same rank (what PEFT writes without `use_effective_conv2d`).
    """
    import torch

    right = torch.einsum("ij...,jq->iq...", core, in_factor)
    return out_factor.T, right.reshape(right.shape[0], -1)


def product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left @ right with any trailing kernel dims of `right` kept: (m, r) @ (r, n, k…) -> (m, n, k…)."""
    return (left @ right.reshape(right.shape[0], -1)).reshape(left.shape[0], *right.shape[1:])


def kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """kron(w1, w2) with the 2-D w1 unsqueezed to w2's rank, so a conv w2 keeps its kernel dims."""
    import torch

    return torch.kron(w1.reshape(*w1.shape, *[1] * (w2.dim() - w1.dim())), w2.contiguous())
