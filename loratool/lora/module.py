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
    #: a 1-D weight (norm layers' `.w_norm`/`.b_norm` diffs in LyCORIS files); never a LoraModule.
    NORM = "norm"


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

    # The members below give LoraModule the interface of the LyCORIS classes in `lora/algorithms/`,
    # so code that handles "any adapter module" needs no isinstance checks.
    tucker = False
    #: A LoRA's factors always give its layer's shape (conv A keeps the kernel dims).
    shape_ambiguous = False

    @property
    def algorithm(self) -> str:
        """"locon" for a conv layer (LyCORIS' name for LoRA on convolutions), else "lora"."""
        return "locon" if self.kind is LayerKind.CONV else "lora"

    @property
    def dora_axis(self) -> str | None:
        """DoRA's magnitude here is PEFT's: one value per output unit ("out"); None without DoRA."""
        return "out" if self.is_dora else None

    @property
    def parameter_count(self) -> int:
        return sum(t.numel() for t in (self.lora_A, self.lora_B, self.magnitude, self.bias) if t is not None)

    def expected_base_shape(self, transposed: bool = False) -> tuple[int, ...]:
        """The base weight shape the module fits; `transposed` is HF `Conv1D` storage, (in, out)."""
        A, B = self.lora_A, self.lora_B
        if self.kind is LayerKind.EMBEDDING:
            return (A.shape[1], B.shape[0])
        if self.kind is LayerKind.CONV:
            return (B.shape[0], *A.shape[1:])
        return (A.shape[1], B.shape[0]) if transposed else (B.shape[0], A.shape[1])

    def fits(self, shape, transposed: bool = False) -> bool:
        return tuple(shape) == self.expected_base_shape(transposed)

    def delta(self, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
              transposed: bool = False) -> torch.Tensor:
        """ΔW = s·B@A in the base weight's shape (computed in float32, then cast to `dtype`, float32 by
        default)."""
        from .delta import COMPUTE_DTYPE, delta_weight

        return delta_weight(self, transposed, device).to(dtype or COMPUTE_DTYPE)

    def bias_delta(self, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The update to the base bias: s·lora_B.bias, as PEFT merges it (float32 by default)."""
        from .delta import COMPUTE_DTYPE

        return None if self.bias is None else self.scale * self.bias.to(device=device, dtype=dtype or COMPUTE_DTYPE)

    def apply_to(self, base: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """The merged weight W + ΔW (or PEFT's DoRA of it) in float32."""
        from .delta import COMPUTE_DTYPE, apply_dora_

        base = base.to(COMPUTE_DTYPE)
        if not self.is_dora:
            return base + self.delta(COMPUTE_DTYPE, base.device, transposed)
        merged = base.clone()
        apply_dora_(merged, base, self, transposed)
        return merged

    def info(self) -> dict:
        return {"algorithm": self.algorithm, "kind": self.kind.value, "dora": self.is_dora, "rank": self.rank,
                "alpha": self.alpha, "scale": self.scale, "tucker": False, "factor": None,
                "parameters": self.parameter_count, "shape": list(self.expected_base_shape())}


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
