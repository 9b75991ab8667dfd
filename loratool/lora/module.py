"""The canonical adapter: one `LoraModule` per targeted module, whatever format it came from."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .scaling import lora_scale

if TYPE_CHECKING:
    import torch


class LayerKind(str, enum.Enum):
    LINEAR = "linear"
    CONV = "conv"
    EMBEDDING = "embedding"


@dataclass
class LoraModule:
    """One adapted module.

    Shapes follow PEFT: linear A (r, in), B (out, r); conv A (r, in, *k), B (out, r, 1...); embedding
    A (r, vocab), B (dim, r). Whether a linear base is stored transposed (HF `Conv1D`) is a property
    of the base checkpoint, so it is decided at merge time, not here.
    """

    name: str
    kind: LayerKind
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    alpha: float
    use_rslora: bool = False
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.use_rslora)

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    @property
    def plain_alpha(self) -> float:
        """The alpha giving the same scale without rsLoRA (alpha' = s·r), for formats with no rsLoRA flag."""
        return self.scale * self.rank if self.use_rslora else self.alpha

    def named_tensors(self) -> dict[str, torch.Tensor]:
        parts = {"lora_A": self.lora_A, "lora_B": self.lora_B, "magnitude": self.magnitude, "lora_B.bias": self.bias}
        return {f"{self.name}.{part}": t for part, t in parts.items() if t is not None}


@dataclass
class Adapter:
    """Target module name -> LoraModule, plus full tensors that replace base tensors outright
    (`modules_to_save`, trained biases, the embedding `base_layer.weight` PEFT may store)."""

    path: Path
    source_format: str
    modules: dict[str, LoraModule]
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
