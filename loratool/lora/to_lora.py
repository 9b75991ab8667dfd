"""Any adapter module as a plain rank-R LoRA, by a truncated SVD of its ΔW.

Targets that only read LoRA (PEFT LoRA, diffusers) cannot hold LoHa, LoKr, Tucker LoCon or full diffs.
Their ΔW is a dense matrix (LoHa's Hadamard product has rank up to r², a Kronecker product rank(w1)·
rank(w2)), so the best rank-R approximation is the truncated SVD (Eckart–Young), and its relative
Frobenius error is the honest measure of what the conversion loses. A module whose ΔW is already a
product of factors (LoRA, LoCon) is re-ranked through QR of its factors, never forming ΔW. Factors
follow the project's convention (docs/svd-extract.md): B = U·√S, A = √S·Vᵀ, alpha = r, so the scale is 1.

Everything here works in PEFT's orientation, ΔW = B@A of shape (out, in·k…), whatever the base stores.
"""

from __future__ import annotations

import torch

from ..errors import AdapterError
from .algorithms import AdapterModule, LoraModule
from .kinds import LayerKind
from .svd import RankRule, relative_error, split_factors, truncate_factored


def logical_factors(module: AdapterModule, device: torch.device | str = "cpu"
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(left, right) with ΔW = scale·left@right in PEFT's orientation, or None for a dense module."""
    pair = module.factors(False, device)
    if pair is None or not module.stored_transposed(False):
        return pair
    return pair[1].T, pair[0].T


def logical_delta(module: AdapterModule, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  base: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled ΔW in PEFT's orientation as a matrix (conv kernels flattened into columns). A DoRA
    module's update depends on the base weight: with `base` (stored layout) it is W' − W."""
    if module.is_dora:
        if base is None:
            raise AdapterError(f"{module.name}: a DoRA module's update depends on the base weight; pass base= "
                               "to convert W' − W")
        stored = module.apply_to(base.to(dtype)).to(dtype) - base.to(dtype)
    else:
        stored = module.delta(dtype, device)
    if module.stored_transposed(False):
        stored = stored.T
    return stored.reshape(stored.shape[0], -1)


def logical_shape(module: AdapterModule) -> tuple[int, ...]:
    shape = tuple(module.expected_base_shape())
    return shape[::-1] if module.stored_transposed(False) else shape


def to_lora(module: AdapterModule, rank: int | None = None, energy: float | None = None, max_rank: int | None = None,
            exact: bool = False, base: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.float32,
            dtype: torch.dtype | None = None) -> tuple[LoraModule, float]:
    """(LoRA of `module`'s ΔW at `rank`, or the smallest rank keeping `energy` of ‖ΔW‖², relative error).

    The error is ‖ΔW − s·B·A‖_F / ‖ΔW‖_F measured on the factors as returned (after rounding to
    `dtype`, default `compute_dtype`). Conv updates become conv LoRA (A (r, in, kh, kw), B (out, r, 1, 1));
    a LoHa/LoKr file that stored the kernel flattened needs `fit_to(base_shape)` first to come back as a
    conv. DoRA folds into ΔW given `base` (W' − W), losing the magnitude's dependence on later merges. A
    `.diff_b`, `.b_norm` or `lora_B.bias` becomes the LoRA's bias (exact: the scale is 1).
    """
    rule = RankRule(rank=rank, energy=energy, max_rank=max_rank)
    if module.kind is LayerKind.NORM:
        raise AdapterError(f"{module.name}: a norm layer's 1-D update has no low-rank (LoRA) form; keep it as a full "
                           "tensor")
    out_dtype = dtype or compute_dtype
    bias = module.bias_delta(out_dtype)
    pair = None if module.is_dora else logical_factors(module)
    if pair is not None:
        B, A, err = truncate_factored(pair[0].to(compute_dtype) * module.scale, pair[1].to(compute_dtype), rule,
                                      out_dtype)
        return LoraModule.from_factors(module.name, module.kind, logical_shape(module), B, A, bias), err
    return dense_lora(module.name, logical_delta(module, compute_dtype, base=base), logical_shape(module), rule,
                      out_dtype, bias, module.kind, exact)


def dense_lora(name: str, matrix: torch.Tensor, shape: tuple[int, ...], rule: RankRule, dtype: torch.dtype,
               bias: torch.Tensor | None = None, kind: LayerKind = LayerKind.LINEAR,
               exact: bool = False) -> tuple[LoraModule, float]:
    """The LoRA (scale 1) of a dense ΔW given as a matrix in PEFT's orientation (conv kernels flattened
    into columns) of a weight of logical `shape`, and its relative error measured on the factors rounded
    to `dtype`."""
    B, A = (f.to(dtype) for f in split_factors(*rule.factorize(matrix, exact)))
    return LoraModule.from_factors(name, kind, shape, B, A, bias), relative_error(matrix, B, A)


def module_as_lora(module: AdapterModule, rule: RankRule, dtype: torch.dtype | None = None
                   ) -> tuple[LoraModule, float]:
    """`to_lora` computed in float32 (float64 for float64 tensors), written in `dtype` or the module's own."""
    stored = module.dtype
    return to_lora(module, rule.rank, rule.energy, rule.max_rank,
                   compute_dtype=torch.promote_types(stored, torch.float32), dtype=dtype or stored)
