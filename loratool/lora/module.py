"""The canonical adapter: one adapter module (`lora/algorithms/`) per targeted module, whatever format
it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .algorithms import AdapterModule


@dataclass
class Adapter:
    """Target module name -> adapter module, plus full tensors that replace base tensors outright
    (`modules_to_save`, trained biases, the embedding `base_layer.weight` PEFT may store)."""

    path: Path
    source_format: str
    modules: dict[str, AdapterModule]
    full_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    #: True while module names are kohya's flattened ones, before resolution against a base.
    unresolved_names: bool = False

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    @property
    def use_dora(self) -> bool:
        return any(m.is_dora for m in self.modules.values())

    @property
    def use_rslora(self) -> bool:
        return any(m.use_rslora for m in self.modules.values())

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the adapter holds, under a readable name (for finiteness checks and reports)."""
        named = {k: t for m in self.modules.values() for k, t in m.named_tensors().items()}
        named.update(self.full_tensors)
        return named
