"""Adapter modules: how one module's tensors turn into ΔW (LoRA, LoCon, LoHa, LoKr, full diffs, DoRA
on top). One class per algorithm behind one interface (`AdapterModule`), one role table, one builder;
see docs/lycoris.md and docs/design-notes.md."""

from .base import AdapterModule, OutputRows, shapes_fit
from .dora import apply_dora_, dora_axis, dora_factor
from .factors import kron, tucker_rebuild, tucker_to_flat
from .full import FullDiff, NormDiff
from .locon import LoCon
from .loha import LoHa
from .lokr import LoKr
from .lora import LoraModule

from .registry import (ALGORITHMS, KNOWN_ROLES, KNOWN_SUFFIXES, REFUSED_ROLES, ROLE_OWNERS, SHARED_ROLES,
                       build_module, split_key)

__all__ = ["ALGORITHMS", "KNOWN_ROLES", "KNOWN_SUFFIXES", "REFUSED_ROLES", "ROLE_OWNERS", "SHARED_ROLES",
           "AdapterModule", "FullDiff", "LoCon", "LoHa", "LoKr", "LoraModule", "NormDiff", "OutputRows",
           "apply_dora_", "build_module", "dora_axis", "dora_factor", "kron", "shapes_fit", "split_key",
           "tucker_rebuild", "tucker_to_flat"]
