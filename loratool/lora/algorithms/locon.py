"""LoCon in the forms `LoraModule` cannot hold: a CP/Tucker `lora_mid`, or DoRA on the input axis.

ΔW = tucker_rebuild(mid, up (out, r)ᵀ, down (r, in)) · alpha/r for `lora_down` (r, in, 1, 1),
`lora_mid` (r, r, kh, kw) and `lora_up` (out, r, 1, 1): the composition of the 1×1, kh×kw and 1×1
convolutions LyCORIS runs. Without a mid it is plain LoRA, (up.flatten(1) @ down.flatten(1)) · alpha/r,
kept in this class only when its `.dora_scale` normalises per input channel. Either way ΔW is a product
of two factors once the kernel is flattened into columns, so it merges streamed, like a LoRA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..kinds import LayerKind
from ..scaling import alpha_or_rank, lora_scale
from .base import AdapterModule, check_scale, check_tensors, problem
from .dora import OUT
from .factors import tucker_rebuild, tucker_to_flat
from .lora import LoraModule

if TYPE_CHECKING:
    import torch

NAME = "LoCon"


class LoCon(AdapterModule):
    roles = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
    factored = True

    def __init__(self, name: str, down: torch.Tensor, up: torch.Tensor, mid: torch.Tensor | None = None,
                 alpha: float | None = None, magnitude: torch.Tensor | None = None):
        check_tensors(name, NAME, {"lora_down.weight": down, "lora_up.weight": up, "lora_mid.weight": mid,
                                   "dora_scale": magnitude})
        super().__init__(name, alpha_or_rank(alpha, down.shape[0]), magnitude)
        self.down, self.up, self.mid = down, up, mid
        r = down.shape[0]
        ok = up.dim() >= 2 and up.shape[1] == r and all(s == 1 for s in up.shape[2:])
        if mid is None:
            ok = ok and up.dim() == down.dim()
        else:
            ok = ok and mid.dim() >= 3 and mid.shape[:2] == (r, r) and all(s == 1 for s in down.shape[2:])
        if not ok:
            shapes = ", ".join(f"{r} {list(t.shape)}" for r, t in self.tensors().items())
            raise problem(name, NAME, f"shapes do not form a product: {shapes}")
        check_scale(self)

    @classmethod
    def from_parts(cls, name: str, parts: dict[str, torch.Tensor], alpha: float | None,
                   magnitude: torch.Tensor | None) -> AdapterModule:
        """A `LoraModule` for plain LoRA/LoCon (and DoRA per output unit, which is PEFT's DoRA); this
        class for a Tucker mid or a per-input-channel dora_scale."""
        down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
        if down is None or up is None:
            raise problem(name, "LoRA", f"lacks lora_{'down' if down is None else 'up'}.weight")
        locon = cls(name, down, up, parts.get("lora_mid.weight"), alpha, magnitude)
        if locon.tucker or (magnitude is not None and locon.dora_axis != OUT):
            return locon
        kind = LayerKind.CONV if down.dim() > 2 else LayerKind.LINEAR
        return LoraModule(name=name, kind=kind, lora_A=down, lora_B=up, alpha=locon.alpha,
                          magnitude=None if magnitude is None else magnitude.reshape(-1))

    @property
    def algorithm(self) -> str:
        """As `LoraModule`: "locon" on a conv, "lora" on a linear layer (a LoRA with input-axis DoRA)."""
        return "locon" if self.kind is LayerKind.CONV else "lora"

    @property
    def tucker(self) -> bool:
        return self.mid is not None

    def tensors(self) -> dict[str, torch.Tensor]:
        named = {"lora_down.weight": self.down, "lora_up.weight": self.up}
        if self.mid is not None:
            named["lora_mid.weight"] = self.mid
        return named

    def natural_shape(self) -> tuple[int, ...]:
        kernel = self.mid.shape[2:] if self.mid is not None else self.down.shape[2:]
        return (self.up.shape[0], self.down.shape[1], *kernel)

    def factors(self, transposed: bool = False, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        up = self.up.to(device=device, dtype=dtype or torch.float32).flatten(1)
        down = self.down.to(device=device, dtype=dtype or torch.float32).flatten(1)
        if self.mid is None:
            left, right = up, down
        else:
            left, right = tucker_to_flat(self.mid.to(device=device, dtype=dtype or torch.float32), up.T, down)
        return (right.T, left.T) if transposed else (left, right)

    def unscaled_delta(self, dtype: torch.dtype, device) -> torch.Tensor:
        up = self.up.to(device=device, dtype=dtype).flatten(1)
        down = self.down.to(device=device, dtype=dtype).flatten(1)
        if self.mid is None:
            return (up @ down).reshape(self.natural_shape())
        return tucker_rebuild(self.mid.to(device=device, dtype=dtype), up.T, down)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank)
