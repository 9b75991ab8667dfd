"""LoHa (FedPara): ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b) · alpha/r, with r = w1_b.shape[0].

Conv layers store either flat factors over the flattened kernel, (out, r) and (r, in·kh·kw), or a
Tucker form (`hada_t1`/`hada_t2` of shape (r, r, kh, kw) with w*_a (r, out), w*_b (r, in)), where each
half is `tucker_rebuild(t, w_a, w_b)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..scaling import alpha_or_rank, lora_scale
from .base import AdapterModule, check_scale, check_tensors, problem
from .factors import tucker_rebuild

if TYPE_CHECKING:
    import torch

NAME = "LoHa"


class LoHa(AdapterModule):
    algorithm = "loha"
    stores_convs_flat = True
    roles = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def __init__(self, name: str, w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor,
                 t1: torch.Tensor | None = None, t2: torch.Tensor | None = None, alpha: float | None = None,
                 magnitude: torch.Tensor | None = None):
        check_tensors(name, NAME, {"hada_w1_a": w1_a, "hada_w1_b": w1_b, "hada_w2_a": w2_a, "hada_w2_b": w2_b,
                                   "hada_t1": t1, "hada_t2": t2, "dora_scale": magnitude})
        super().__init__(name, alpha_or_rank(alpha, w1_b.shape[0]), magnitude)
        self.w1_a, self.w1_b, self.w2_a, self.w2_b, self.t1, self.t2 = w1_a, w1_b, w2_a, w2_b, t1, t2
        self._check()
        check_scale(self)

    @classmethod
    def from_parts(cls, name: str, parts: dict[str, torch.Tensor], alpha: float | None,
                   magnitude: torch.Tensor | None) -> "LoHa":
        missing = [r for r in cls.roles[:4] if r not in parts]
        if missing or ("hada_t1" in parts) != ("hada_t2" in parts):
            lacking = missing or ["hada_t2" if "hada_t1" in parts else "hada_t1"]
            raise problem(name, NAME, f"lacks {', '.join(lacking)} (has {', '.join(sorted(parts))})")
        return cls(name, *(parts[r] for r in cls.roles[:4]), parts.get("hada_t1"), parts.get("hada_t2"),
                   alpha, magnitude)

    @property
    def tucker(self) -> bool:
        return self.t1 is not None

    def halves(self) -> tuple[tuple, tuple]:
        """(t, w_a, w_b) per Hadamard half; t is None without Tucker."""
        return ((self.t1, self.w1_a, self.w1_b), (self.t2, self.w2_a, self.w2_b))

    def _check(self) -> None:
        shapes = []
        for t, a, b in self.halves():
            if a.dim() != 2 or b.dim() != 2:
                raise problem(self.name, NAME, f"factors must be matrices, got {list(a.shape)} and {list(b.shape)}")
            if t is None:
                ok = a.shape[1] == b.shape[0]
                shape = (a.shape[0], b.shape[1])
            else:
                ok = t.dim() >= 3 and t.shape[0] == a.shape[0] and t.shape[1] == b.shape[0]
                shape = (a.shape[1], b.shape[1], *t.shape[2:])
            if not ok:
                raise problem(self.name, NAME, "shapes do not form a product: "
                              + ", ".join(f"{list(x.shape)}" for x in (t, a, b) if x is not None))
            shapes.append(shape)
        if shapes[0] != shapes[1]:
            raise problem(self.name, NAME, f"halves disagree: {list(shapes[0])} vs {list(shapes[1])}")

    def tensors(self) -> dict[str, torch.Tensor]:
        named = {"hada_w1_a": self.w1_a, "hada_w1_b": self.w1_b, "hada_w2_a": self.w2_a, "hada_w2_b": self.w2_b}
        if self.tucker:
            named.update(hada_t1=self.t1, hada_t2=self.t2)
        return named

    def natural_shape(self) -> tuple[int, ...]:
        if self.tucker:
            return (self.w1_a.shape[1], self.w1_b.shape[1], *self.t1.shape[2:])
        return (self.w1_a.shape[0], self.w1_b.shape[1])

    def half(self, index: int, dtype: torch.dtype, device) -> torch.Tensor:
        """One Hadamard factor, unscaled, in the natural shape."""
        t, a, b = (x if x is None else x.to(device=device, dtype=dtype) for x in self.halves()[index])
        return a @ b if t is None else tucker_rebuild(t, a, b)

    def unscaled_delta(self, dtype: torch.dtype, device) -> torch.Tensor:
        return self.half(0, dtype, device) * self.half(1, dtype, device)

    @property
    def rank(self) -> int:
        return self.w1_b.shape[0]

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank)
