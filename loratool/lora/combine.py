"""Combining several LoRA updates of one module, on the true deltas ΔWᵢ = sᵢ·Bᵢ·Aᵢ.

PEFT's `add_weighted_adapter` (linear, ties, dare_*, magnitude_prune) and kohya's `merge_lora.py` mix
the A factors and the B factors separately, so the product picks up cross terms Bᵢ·Aⱼ (peft#3004).
Here every method works on the deltas themselves:

- factor methods (`cat`, `linear`, `svd`): Σ wᵢ·ΔWᵢ is exactly [w₁s₁B₁ | w₂s₂B₂ | …] @ [A₁; A₂; …], a
  product of stacked factors, kept as is (rank Σrᵢ) or truncated through QR without forming ΔW;
- dense methods (`ties`, `dare_linear`, `dare_ties`, `magnitude_prune`): element-wise rules that need
  the full ΔWᵢ, one module at a time in float32, with PEFT `merge_utils` conventions (density = fraction
  kept, DARE rescales survivors by 1/density, the majority sign is elected on the pruned deltas, TIES
  averages the agreeing entries).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from .algorithms import AdapterModule
from .delta import COMPUTE_DTYPE
from .methods import METHODS, MajoritySign
from .to_lora import logical_delta, logical_factors

@dataclass(frozen=True)
class Term:
    """One adapter's weighted update of a module, in PEFT's orientation (out × in·k…)."""

    weight: float
    module: AdapterModule

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(left, right) with w·s folded into left: w·ΔW = left @ right; None for a dense module."""
        pair = logical_factors(self.module)
        if pair is None:
            return None
        return pair[0].to(COMPUTE_DTYPE) * (self.weight * self.module.scale), pair[1].to(COMPUTE_DTYPE)

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """s·ΔW, float32, without the weight (conv kernels flattened into columns)."""
        return logical_delta(self.module, COMPUTE_DTYPE, device)


def stacked_factors(terms: list[Term]) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ wᵢ·ΔWᵢ = left @ right exactly, rank Σrᵢ; each scale is applied once, inside left. Every term
    must be factored (`Term.factors` not None)."""
    pairs = [t.factors() for t in terms]
    return torch.cat([p[0] for p in pairs], 1), torch.cat([p[1] for p in pairs], 0)


def module_seed(seed: int, module_name: str) -> int:
    """DARE's seed for one module: fixed by `--seed` and the module name, not by the order of modules,
    so a module gets the same masks whatever else is combined."""
    return seed ^ zlib.crc32(module_name.encode())


def module_generator(seed: int, module_name: str, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(module_seed(seed, module_name))


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density·n) entries of largest magnitude (PEFT `magnitude_based_pruning`)."""
    keep = int(density * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    if keep > 0:
        mask[torch.topk(delta.abs().reshape(-1), k=keep).indices] = True
    return mask.reshape(delta.shape)


def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    return delta if density >= 1 else delta * magnitude_mask(delta, density)


def random_prune(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop each entry with probability 1 − density and rescale survivors by 1/density."""
    if density >= 1:
        return delta
    keep = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * keep / density


def elect_and_merge(pruned: torch.Tensor, weights: torch.Tensor, majority_sign: MajoritySign) -> torch.Tensor:
    """TIES: elect each entry's sign from the pruned deltas (sum or count), then average the weighted
    entries that agree with it (PEFT `calculate_majority_sign_mask` + `disjoint_merge`)."""
    signs = pruned.sign()
    votes = pruned.sum(0) if majority_sign == "total" else signs.sum(0)
    agree = signs == torch.where(votes >= 0, 1.0, -1.0)
    weighted = pruned * weights.reshape(-1, *[1] * (pruned.dim() - 1))
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


@dataclass(frozen=True)
class DenseOptions:
    density: float
    majority_sign: MajoritySign = "total"
    seed: int = 0


def _weighted_sum(pruned: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (pruned * weights.reshape(-1, *[1] * (pruned.dim() - 1))).sum(0)


def dense_combine(method: str, deltas: list[torch.Tensor], weights: list[float], options: DenseOptions,
                  module_name: str) -> torch.Tensor:
    """One dense method (`METHODS[method]`: how it prunes, whether it elects signs) on the full deltas of
    one module; returns the combined ΔW (float32)."""
    rule = METHODS[method]
    device = deltas[0].device
    w = torch.tensor(weights, dtype=COMPUTE_DTYPE, device=device)
    if rule.prune == "magnitude":
        pruned = torch.stack([magnitude_prune(d, options.density) for d in deltas])
    else:
        generator = module_generator(options.seed, module_name, device)
        pruned = torch.stack([random_prune(d, options.density, generator) for d in deltas])
    if rule.elect_sign:
        return elect_and_merge(pruned, w, options.majority_sign)
    return _weighted_sum(pruned, w)
