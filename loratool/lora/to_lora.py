"""Any adapter module as a plain rank-R LoRA, by a truncated SVD of its ΔW.

Targets that only read LoRA (PEFT LoRA, diffusers) cannot hold LoHa, LoKr, Tucker LoCon or full diffs.
Their ΔW is a dense matrix (LoHa's Hadamard product has rank up to r², a Kronecker product rank(w1)·
rank(w2)), so the best rank-R approximation is the truncated SVD (Eckart–Young), and its relative
Frobenius error is the honest measure of what the conversion loses. Factors follow the project's
convention (docs/svd-extract.md): B = U·√S, A = √S·Vᵀ, alpha = r, so the scale is 1.
"""

from __future__ import annotations

import torch

from ..errors import AdapterError
from .module import LayerKind, LoraModule
from .delta import delta_factors
from .svd import RankRule, relative_error, split_factors, truncate_factored


def _delta_2d(module, base: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """ΔW in the base layout as a matrix, conv kernels flattened into columns."""
    if module.is_dora:
        if base is None:
            raise AdapterError(f"{module.name}: a DoRA module's update depends on the base weight; pass base= "
                               "to convert W' − W")
        delta = module.apply_to(base.to(dtype)).to(dtype) - base.to(dtype)
    else:
        delta = module.delta(dtype)
    return delta.reshape(delta.shape[0], -1)


def to_lora(module, rank: int | None = None, energy: float | None = None, max_rank: int | None = None,
            exact: bool = False, base: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.float32,
            dtype: torch.dtype | None = None) -> tuple[LoraModule, float]:
    """(LoRA of `module`'s ΔW at `rank`, or the smallest rank keeping `energy` of ‖ΔW‖², relative error).

    The error is ‖ΔW − s·B·A‖_F / ‖ΔW‖_F measured on the factors as returned (after rounding to
    `dtype`, default `compute_dtype`). Conv updates become conv LoRA (A (r, in, kh, kw), B (out, r, 1, 1));
    a LoHa/LoKr file that stored the kernel flattened needs `fit_to(base_shape)` first to come back as a
    conv. A plain LoRA input is re-ranked through the SVD of its factors, never forming ΔW. DoRA folds
    into ΔW given `base` (W' − W), losing the magnitude's dependence on later merges. A `.diff_b`,
    `.b_norm` or `lora_B.bias` becomes the LoRA's bias (exact: the scale is 1).
    """
    rule = RankRule(rank=rank, energy=energy, max_rank=max_rank)
    if module.kind is LayerKind.NORM:
        raise AdapterError(f"{module.name}: a norm layer's 1-D update has no low-rank (LoRA) form; keep it as a full "
                           "tensor")
    out_dtype = dtype or compute_dtype
    shape = tuple(module.expected_base_shape())
    bias = module.bias_delta(out_dtype)
    if isinstance(module, LoraModule) and not module.is_dora:
        left, right = delta_factors(module)
        B, A, err = truncate_factored(left.to(compute_dtype) * module.scale, right.to(compute_dtype), rule, out_dtype)
        return lora_of_factors(module.name, module.kind, shape, B, A, bias), err
    return dense_lora(module.name, _delta_2d(module, base, compute_dtype), shape, rule, out_dtype, bias,
                      module.kind, exact)


def dense_lora(name: str, matrix: torch.Tensor, shape: tuple[int, ...], rule: RankRule, dtype: torch.dtype,
               bias: torch.Tensor | None = None, kind: LayerKind = LayerKind.LINEAR,
               exact: bool = False) -> tuple[LoraModule, float]:
    """The LoRA (scale 1) of a dense ΔW given as a matrix (conv kernels flattened into columns) of a
    weight of `shape`, and its relative error measured on the factors rounded to `dtype`."""
    B, A = (f.to(dtype) for f in split_factors(*rule.factorize(matrix, exact)))
    return lora_of_factors(name, kind, shape, B, A, bias), relative_error(matrix, B, A)


def lora_of_factors(name: str, kind: LayerKind, shape: tuple[int, ...], B: torch.Tensor, A: torch.Tensor,
                    bias: torch.Tensor | None) -> LoraModule:
    """B (out, r) and A (r, in·k…) with ΔW2d = B@A, as a PEFT-layout LoraModule for a weight of `shape`."""
    r = A.shape[0]
    if kind is LayerKind.EMBEDDING:  # the base layout is (vocab, dim) = (B·A)ᵀ
        lora_A, lora_B = B.T, A.T
    elif len(shape) > 2:
        lora_A, lora_B = A.reshape(r, *shape[1:]), B.reshape(shape[0], r, *[1] * (len(shape) - 2))
    else:
        lora_A, lora_B = A, B
    return LoraModule(name=name, kind=LayerKind.CONV if len(shape) > 2 else kind, lora_A=lora_A.cpu().contiguous(),
                      lora_B=lora_B.cpu().contiguous(), alpha=float(r), bias=None if bias is None else bias.cpu())
