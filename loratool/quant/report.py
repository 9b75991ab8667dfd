"""What requantization did to an adapter's update, per changed tensor.

For base W (as stored, dequantized), update ΔW and the merged tensor as written, Q(W+ΔW):
- `error` = ‖Q(W+ΔW) − (W+ΔW)‖ / ‖ΔW‖: the rounding of the merged tensor, against the update's size;
- `survived` = ‖Q(W+ΔW) − Q(W)‖ / ‖ΔW‖: how much the stored tensor moved, against how much it should;
- `aligned` = ⟨Q(W+ΔW) − Q(W), ΔW⟩ / ‖ΔW‖²: the share of ΔW's own direction that the change carries.
`survived` alone can look healthy while the change is mostly rounding noise (a fresh scale re-rounds
every element), so the warning uses the smaller of `survived` and `aligned`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Below this share of the update surviving, merge warns and suggests a float output.
SURVIVAL_WARNING = 0.5


@dataclass(frozen=True)
class RoundingFigure:
    name: str
    encoding: str
    delta_norm: float
    error: float
    survived: float
    aligned: float

    @property
    def kept(self) -> float:
        return min(self.survived, self.aligned)

    def to_json(self) -> dict:
        return {"name": self.name, "encoding": self.encoding, "delta_norm": _finite(self.delta_norm),
                "error": _finite(self.error), "survived": _finite(self.survived), "aligned": _finite(self.aligned)}


def _finite(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None


class RoundingTally:
    """Sums over the chunks of one tensor, so that a tensor streamed in rows gets its figures too."""

    def __init__(self) -> None:
        self._delta = self._error = self._moved = self._dot = 0.0

    def add(self, base: torch.Tensor, exact: torch.Tensor, written: torch.Tensor) -> None:
        """`base` and `written` dequantized, `exact` = base + ΔW; all float32, same shape, any device.
        `written` is used up. Each chunk's sums are float32 dot products (BLAS, blocked), accumulated
        across chunks in float64."""
        delta = (exact - base).reshape(-1)
        moved = written.sub_(base).reshape(-1)
        self._delta += float(torch.dot(delta, delta))
        self._moved += float(torch.dot(moved, moved))
        self._dot += float(torch.dot(moved, delta))
        error = moved.sub_(delta)
        self._error += float(torch.dot(error, error))

    def figure(self, name: str, encoding: str) -> RoundingFigure:
        norm = math.sqrt(self._delta)
        if norm == 0:
            return RoundingFigure(name, encoding, 0.0, 0.0, 1.0, 1.0)
        return RoundingFigure(name, encoding, norm, math.sqrt(self._error) / norm, math.sqrt(self._moved) / norm,
                              self._dot / self._delta)


def summary(figures: list[RoundingFigure]) -> str:
    """One line for the whole merge: how many tensors were requantized and how much of the update kept."""
    if not figures:
        return ""
    kept = sorted(f.kept for f in figures)
    median = kept[len(kept) // 2]
    weak = sum(1 for k in kept if k < SURVIVAL_WARNING)
    line = (f"requantized {len(figures)} tensor(s): median {median:.0%} of the update survived "
            f"(worst {kept[0]:.0%}), median rounding error {sorted(f.error for f in figures)[len(figures) // 2]:.2f}×‖ΔW‖")
    if weak:
        line += f"; {weak} tensor(s) kept under {SURVIVAL_WARNING:.0%} of their update"
    return line


def warning(figures: list[RoundingFigure]) -> str | None:
    weak = [f for f in figures if f.kept < SURVIVAL_WARNING]
    if not weak:
        return None
    worst = min(weak, key=lambda f: f.kept)
    return (f"rounding to the base's encoding lost most of the adapter in {len(weak)} tensor(s) (worst: {worst.name}, "
            f"{worst.kept:.0%} kept, {worst.encoding}); merge with --dtype bfloat16 to keep it (docs/quantized.md)")
