"""LoKr: ΔW = kron(w1, w2) · scale.

w1 is `lokr_w1` (a, c) or `lokr_w1_a`·`lokr_w1_b`; w2 is `lokr_w2` (b, d[, kh, kw]), or
`lokr_w2_a` (b, r)·`lokr_w2_b` (r, d·kh·kw), or Tucker: `tucker_rebuild(lokr_t2, lokr_w2_a (r, b),
lokr_w2_b (r, d))`. The update has shape (a·b, c·d[, kh, kw]).

The scale is alpha/dim, where LyCORIS takes dim from the factored half: w2_b.shape[0] when w2 is
factored, else w1_b.shape[0] when w1 is; with both halves full there is no rank and the scale is 1.
PEFT's LoKr instead always uses its configured alpha/r, which is why `dim` is a field here and not
derived: `build_module` derives it by LyCORIS' rule, the PEFT reader sets it from the config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..scaling import alpha_or_rank, lora_scale
from .base import AdapterModule, check_scale, check_tensors, problem
from .factors import kron, product, tucker_rebuild

if TYPE_CHECKING:
    import torch

NAME = "LoKr"


class LoKr(AdapterModule):
    algorithm = "lokr"
    stores_convs_flat = True
    roles = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def __init__(self, name: str, w1: torch.Tensor | None = None, w1_a: torch.Tensor | None = None,
                 w1_b: torch.Tensor | None = None, w2: torch.Tensor | None = None, w2_a: torch.Tensor | None = None,
                 w2_b: torch.Tensor | None = None, t2: torch.Tensor | None = None, alpha: float | None = None,
                 dim: int | None = None, magnitude: torch.Tensor | None = None):
        check_tensors(name, NAME, {"lokr_w1": w1, "lokr_w1_a": w1_a, "lokr_w1_b": w1_b, "lokr_w2": w2, "lokr_w2_a": w2_a,
                                   "lokr_w2_b": w2_b, "lokr_t2": t2, "dora_scale": magnitude})
        super().__init__(name, alpha, magnitude)
        self.w1, self.w1_a, self.w1_b, self.w2, self.w2_a, self.w2_b, self.t2 = w1, w1_a, w1_b, w2, w2_a, w2_b, t2
        self.dim = dim
        self._check()
        check_scale(self)

    @classmethod
    def from_parts(cls, name: str, parts: dict[str, torch.Tensor], alpha: float | None,
                   magnitude: torch.Tensor | None) -> "LoKr":
        """LyCORIS' scale rule: dim from the factored half; no alpha means alpha = dim; both full -> 1."""
        tensors = {role.removeprefix("lokr_"): parts.get(role) for role in cls.roles}
        dim = (tensors["w2_b"].shape[0] if tensors["w2_b"] is not None
               else tensors["w1_b"].shape[0] if tensors["w1_b"] is not None else None)
        alpha = None if dim is None else alpha_or_rank(alpha, dim)
        return cls(name, **tensors, alpha=alpha, dim=dim, magnitude=magnitude)

    def _check(self) -> None:
        for half, full, a, b in (("w1", self.w1, self.w1_a, self.w1_b), ("w2", self.w2, self.w2_a, self.w2_b)):
            if full is not None and (a is not None or b is not None):
                raise problem(self.name, NAME, f"has both lokr_{half} and its factors lokr_{half}_a/_b")
            if full is None and (a is None or b is None):
                have = [r for r, t in self.tensors().items()]
                raise problem(self.name, NAME, f"lacks lokr_{half} (or both lokr_{half}_a and lokr_{half}_b); "
                              f"has {', '.join(have)}")
        if self.t2 is not None and self.w2 is not None:
            raise problem(self.name, NAME, "has lokr_t2 but no factored w2")
        if (self.w1 if self.w1 is not None else self.w1_a).dim() != 2:
            raise problem(self.name, NAME, "w1 must be a matrix")
        ok = self.w1 is not None or (self.w1_b.dim() == 2 and self.w1_a.shape[1] == self.w1_b.shape[0])
        if self.w2 is None and self.t2 is None:
            ok = ok and self.w2_a.dim() == 2 and self.w2_a.shape[1] == self.w2_b.shape[0]
        elif self.w2 is None:
            ok = ok and (self.w2_a.dim() == 2 and self.w2_b.dim() == 2 and self.t2.dim() >= 3
                         and self.t2.shape[0] == self.w2_a.shape[0] and self.t2.shape[1] == self.w2_b.shape[0])
        elif self.w2.dim() < 2:
            ok = False
        if not ok:
            raise problem(self.name, NAME, "shapes do not form a Kronecker product: "
                          + ", ".join(f"{r} {list(t.shape)}" for r, t in self.tensors().items()))

    def tensors(self) -> dict[str, torch.Tensor]:
        named = {"lokr_w1": self.w1, "lokr_w1_a": self.w1_a, "lokr_w1_b": self.w1_b, "lokr_w2": self.w2,
                 "lokr_w2_a": self.w2_a, "lokr_w2_b": self.w2_b, "lokr_t2": self.t2}
        return {role: t for role, t in named.items() if t is not None}

    @property
    def tucker(self) -> bool:
        return self.t2 is not None

    @property
    def w1_shape(self) -> tuple[int, int]:
        return tuple(self.w1.shape) if self.w1 is not None else (self.w1_a.shape[0], self.w1_b.shape[1])

    @property
    def w2_shape(self) -> tuple[int, ...]:
        if self.w2 is not None:
            return tuple(self.w2.shape)
        if self.t2 is not None:
            return (self.w2_a.shape[1], self.w2_b.shape[1], *self.t2.shape[2:])
        return (self.w2_a.shape[0], *self.w2_b.shape[1:])

    @property
    def factor(self) -> list[int]:
        """The shape (a, c) of the small Kronecker factor w1."""
        return list(self.w1_shape)

    def natural_shape(self) -> tuple[int, ...]:
        (a, c), (b, d, *k) = self.w1_shape, self.w2_shape
        return (a * b, c * d, *k)

    def full_w1(self, dtype: torch.dtype, device) -> torch.Tensor:
        if self.w1 is not None:
            return self.w1.to(device=device, dtype=dtype)
        return self.w1_a.to(device=device, dtype=dtype) @ self.w1_b.to(device=device, dtype=dtype)

    def full_w2(self, dtype: torch.dtype, device) -> torch.Tensor:
        """w2 as one tensor, (b, d, kh, kw) when the file's layout keeps the kernel, else (b, d·kh·kw)."""
        cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        if self.w2 is not None:
            return cast(self.w2)
        if self.t2 is not None:
            return tucker_rebuild(cast(self.t2), cast(self.w2_a), cast(self.w2_b))
        return product(cast(self.w2_a), cast(self.w2_b))

    def unscaled_delta(self, dtype: torch.dtype, device) -> torch.Tensor:
        return kron(self.full_w1(dtype, device), self.full_w2(dtype, device))

    @property
    def rank(self) -> int | None:
        return self.dim

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.dim) if self.dim and self.alpha is not None else 1.0
