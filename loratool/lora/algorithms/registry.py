"""The one table of LyCORIS tensor roles, and the one builder from a module's tensors to its class.

A reader splits each key `<module>.<role>` with `split_key` (longest role first, so
`x.lora_down.weight` is `lora_down.weight`, not `weight`), groups the tensors per module and calls
`build_module(name, parts)`. Roles of algorithms loratool cannot merge exactly are in the table too,
so they are refused by name rather than reported as unknown.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ...errors import AdapterError
from .base import AdapterModule, dtype_of
from .full import FullDiff, NormDiff
from .locon import LoCon
from .loha import LoHa
from .lokr import LoKr

if TYPE_CHECKING:
    import torch

#: Roles every low-rank algorithm may carry next to its own.
SHARED_ROLES = ("alpha", "dora_scale")

#: Algorithm name -> the class that builds it from a file's tensors (`from_parts`). LoCon builds a
#: `LoraModule` where the tensors are a plain LoRA. A new algorithm is one class and one line here.
ALGORITHMS: dict[str, type[AdapterModule]] = {"locon": LoCon, "loha": LoHa, "lokr": LoKr, "full": FullDiff,
                                                  "norm": NormDiff}

#: Roles of LyCORIS algorithms whose update is not an additive ΔW loratool can form -> what they are.
REFUSED_ROLES: dict[str, str] = {
    "oft_blocks": "OFT/BOFT (an orthogonal rotation of the weight)",
    "oft_diag": "OFT (an orthogonal rotation of the weight)",
    "oft_R": "OFT (an orthogonal rotation of the weight)",
    "rescale": "OFT/BOFT (an orthogonal rotation of the weight)",
    "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA", "bm.weight": "GLoRA",
    "on_input": "IA3 (a per-channel scaling of activations)",
    "weight": "IA3 (a per-channel scaling of activations)",
    "q_layer.weight": "T-LoRA", "p_layer.weight": "T-LoRA", "lambda_layer": "T-LoRA",
    "lokr_t1": "LoKr with a Tucker w1 (lokr_t1), which LyCORIS never writes",
    "set_weight": "set_weight (replaces the weight outright rather than adding to it)",
}

#: Role -> owning algorithm, for every role loratool merges.
ROLE_OWNERS: dict[str, str] = {role: algo for algo, cls in ALGORITHMS.items() for role in cls.roles}

#: Every known role, longest first: the order to try suffixes in when splitting a key.
#: Other spellings of LoRA's roles in files that otherwise use kohya's scheme: PEFT's names, which
#: ComfyUI, diffusion-pipe and ai-toolkit write under `diffusion_model.`, and Mochi's without `.weight`.
ROLE_ALIASES: dict[str, str] = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                                "lora_A": "lora_down.weight", "lora_B": "lora_up.weight"}

KNOWN_ROLES: tuple[str, ...] = tuple(sorted({*ROLE_OWNERS, *SHARED_ROLES, *REFUSED_ROLES, *ROLE_ALIASES},
                                            key=lambda r: (-len(r), r)))

#: The same, as key suffixes with the dot (`.hada_w1_a`), for readers that match on `str.endswith`.
KNOWN_SUFFIXES: tuple[str, ...] = tuple(f".{role}" for role in KNOWN_ROLES)


def split_key(key: str) -> tuple[str, str] | None:
    """`lora_unet_x.hada_w1_a` -> (`lora_unet_x`, `hada_w1_a`), with an alias spelled canonically
    (`x.lora_A.weight` -> (`x`, `lora_down.weight`)); None when no known role ends the key."""
    for role in KNOWN_ROLES:
        if key.endswith(f".{role}") and len(key) > len(role) + 1:
            return key[: -len(role) - 1], ROLE_ALIASES.get(role, role)
    return None


def _scalar_alpha(name: str, parts: dict[str, torch.Tensor]) -> float | None:
    alpha = parts.get("alpha")
    if alpha is None:
        return None
    if alpha.numel() != 1:
        raise AdapterError(f"{name}: .alpha should be a scalar, got shape {list(alpha.shape)}")
    dtype, float8 = dtype_of(alpha)
    if float8 or dtype in ("bool", "BOOL"):
        raise AdapterError(f"{name}: .alpha is stored as {dtype}; an alpha is a float or integer scalar")
    value = float(alpha.reshape(()).item())
    if not math.isfinite(value):
        raise AdapterError(f"{name}: .alpha is {value}, not a finite number")
    return value


def build_module(name: str, parts: dict[str, torch.Tensor]) -> AdapterModule:
    """The module for one name's tensors, keyed by role (`hada_w1_a`, `alpha`, `lora_down.weight`…).

    Raises `AdapterError`, naming the module and the algorithm, for unknown or refused roles, tensors
    of two algorithms, a missing half, or shapes that do not form the algorithm's product.
    """
    unknown = sorted(set(parts) - set(KNOWN_ROLES))
    if unknown:
        raise AdapterError(f"{name}: unknown adapter tensor(s) {', '.join('.' + r for r in unknown)}")
    refused = sorted({REFUSED_ROLES[r] for r in parts if r in REFUSED_ROLES})
    if refused:
        roles = ", ".join(f".{r}" for r in sorted(parts) if r in REFUSED_ROLES)
        raise AdapterError(f"{name}: {refused[0]} modules ({roles}) are not supported; loratool merges LoRA, "
                           "LoCon, LoHa, LoKr, full diffs and DoRA")
    owners = sorted({ROLE_OWNERS[r] for r in parts if r not in SHARED_ROLES})
    if not owners:
        raise AdapterError(f"{name}: only {', '.join('.' + r for r in sorted(parts))}, no weights")
    if len(owners) > 1:
        raise AdapterError(f"{name}: mixes tensors of {' and '.join(owners)}")
    alpha, magnitude = _scalar_alpha(name, parts), parts.get("dora_scale")
    own = {r: t for r, t in parts.items() if r not in SHARED_ROLES}
    module = ALGORITHMS[owners[0]].from_parts(name, own, alpha, magnitude)
    if magnitude is not None:
        _check_magnitude(module, magnitude)
    return module


def _check_magnitude(module: AdapterModule, magnitude: torch.Tensor) -> None:
    """One value per output unit, or per input channel (which divides a flattened kernel's columns)."""
    out, columns = module.expected_base_shape()[:2]
    per_out = magnitude.shape[0] == out and magnitude.numel() == out
    if not (per_out or columns % magnitude.numel() == 0):
        raise AdapterError(f"{module.name}: dora_scale {list(magnitude.shape)} has neither one value per output "
                           f"unit nor one per input channel of a {list(module.expected_base_shape())} update")

