"""Result objects shared by several commands: `LowRankResult` by those that write low-rank adapters
(svd-extract, resize, combine), `ConvertResult` by convert and its GGUF export."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..lora.svd import energy_of


@dataclass
class ModuleReport:
    name: str
    kind: str
    shape: list[int]
    rank: int
    energy: float
    relative_error: float
    delta_norm: float

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "shape": self.shape, "rank": self.rank,
                "energy": round(self.energy, 6), "relative_error": round(self.relative_error, 6)}


@dataclass
class FullTensorReport:
    name: str
    kept: bool
    reason: str

    def to_json(self) -> dict:
        return {"name": self.name, "kept": self.kept, "reason": self.reason}


@dataclass
class LowRankResult:
    """What `svd_extract` and `resize` report: per module rank and error, and the totals."""

    output: Path
    method: str
    modules: list[ModuleReport]
    full_tensors: list[FullTensorReport]
    unchanged: int
    parameters: int
    adapter_bytes: int
    source_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def relative_error(self) -> float:
        """Frobenius error over all modules together: √(Σ errᵢ²‖ΔWᵢ‖²) / √(Σ‖ΔWᵢ‖²)."""
        total = sum(m.delta_norm**2 for m in self.modules)
        lost = sum((m.relative_error * m.delta_norm) ** 2 for m in self.modules)
        return math.sqrt(lost / total) if total else 0.0

    @property
    def compression(self) -> float:
        return self.source_bytes / self.adapter_bytes if self.adapter_bytes else math.inf

    def to_json(self) -> dict:
        return {
            "output": str(self.output),
            "method": self.method,
            "modules": [m.to_json() for m in self.modules],
            "full_tensors": [t.to_json() for t in self.full_tensors],
            "unchanged_tensors": self.unchanged,
            "totals": {
                "modules": len(self.modules),
                "parameters": self.parameters,
                "adapter_bytes": self.adapter_bytes,
                "source_bytes": self.source_bytes,
                "compression": round(self.compression, 2),
                "relative_error": round(self.relative_error, 6),
                "energy": round(energy_of(self.relative_error), 6),
            },
            "seconds": round(self.seconds, 3),
            "notes": self.notes,
        }


@dataclass
class ConvertResult:
    output: Path
    source_format: str
    target_format: str
    modules: int
    files: list[str]
    notes: list[str] = field(default_factory=list)
    #: With --rank/--energy: module -> relative Frobenius error of its LoRA approximation; else None.
    errors: dict[str, float] | None = None

    @property
    def max_error(self) -> float | None:
        return max(self.errors.values(), default=0.0) if self.errors is not None else None

    def to_json(self) -> dict:
        return {"output": str(self.output), "from": self.source_format, "to": self.target_format,
                "modules": self.modules, "files": self.files, "notes": self.notes, "errors": self.errors,
                "max_error": self.max_error}
