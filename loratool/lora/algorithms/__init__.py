"""Adapter algorithms: how one adapter module's tensors turn into ΔW (LoRA/LoCon, LoHa, LoKr, full
diffs, DoRA on top). One class per algorithm, one role table, one builder; see docs/lycoris.md."""

from .base import AlgorithmModule, shapes_fit
from .dora import apply_lycoris_dora, dora_axis, lycoris_dora_factor
from .factors import kron, tucker_rebuild, tucker_to_flat
from .full import FullDiff, NormDiff
from .locon import LoCon
from .loha import LoHa
from .lokr import LoKr
from .registry import (ALGORITHMS, KNOWN_ROLES, KNOWN_SUFFIXES, REFUSED_ROLES, ROLE_OWNERS, SHARED_ROLES,
                       AdapterModule, build_module, split_key)

__all__ = ["ALGORITHMS", "KNOWN_ROLES", "KNOWN_SUFFIXES", "REFUSED_ROLES", "ROLE_OWNERS", "SHARED_ROLES",
           "AdapterModule", "AlgorithmModule", "FullDiff", "LoCon", "LoHa", "LoKr", "NormDiff", "apply_lycoris_dora",
           "lycoris_dora_factor",
           "build_module", "dora_axis", "kron", "shapes_fit", "split_key", "tucker_rebuild", "tucker_to_flat"]
