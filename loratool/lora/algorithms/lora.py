"""Plain LoRA (and PEFT's DoRA on it): ΔW = s·B@A, s = alpha/r or alpha/√r with rsLoRA.

Shapes follow PEFT: linear A (r, in), B (out, r); conv A (r, in, *k), B (out, r, 1…); embedding A (r,
vocab), B (dim, r), whose update to the (vocab, dim) table is (B@A)ᵀ. Whether a linear base is stored
transposed (HF `Conv1D`) is a property of the base checkpoint, decided by the resolver, not here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..kinds import LayerKind
from ..scaling import lora_scale, plain_alpha
from ...errors import AdapterError
from .base import OUT, AdapterModule, Rows, check_scale, check_tensors, rows_of, stored

if TYPE_CHECKING:
    import torch


def _pointwise_2d(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A 1×1 conv kernel's shape as the linear weight it is; other shapes unchanged."""
    return tuple(shape[:2]) if len(shape) == 4 and tuple(shape[2:]) == (1, 1) else tuple(shape)


class LoraModule(AdapterModule):
    """One LoRA module. `kind` is a field here (a LoRA's factors say linear, conv or embedding)."""

    roles = ("lora_down.weight", "lora_up.weight")
    plain_lora = True
    factored = True
    #: An instance attribute here, shadowing the base's shape-derived property.
    kind: LayerKind = None  # type: ignore[assignment]

    def __init__(self, name: str, kind: LayerKind, lora_A: torch.Tensor, lora_B: torch.Tensor, alpha: float,
                 use_rslora: bool = False, magnitude: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        check_tensors(name, "LoRA", {"lora_A": lora_A, "lora_B": lora_B, "magnitude": magnitude, "lora_B.bias": bias})
        super().__init__(name, alpha, magnitude, bias)
        self.kind, self.lora_A, self.lora_B, self.use_rslora = kind, lora_A, lora_B, use_rslora
        self._check_shapes()
        check_scale(self)

    def _check_shapes(self) -> None:
        A, B, out = self.lora_A, self.lora_B, self.lora_B.shape[0]
        trailing_ones = all(s == 1 for s in B.shape[2:]) and (self.kind is LayerKind.CONV or B.dim() == 2)
        if B.dim() < 2 or B.shape[1] != A.shape[0] or not trailing_ones or (A.dim() < 2):
            raise AdapterError(f"{self.name}: LoRA factors lora_A {list(A.shape)} and lora_B {list(B.shape)} do not "
                               "form a product (lora_B's columns must equal lora_A's rows)")
        for role, tensor in (("magnitude", self.magnitude), ("lora_B.bias", self.bias)):
            if tensor is not None and tensor.numel() != out:
                raise AdapterError(f"{self.name}: .{role} {list(tensor.shape)} should hold one value per output "
                                   f"unit ({out})")

    @classmethod
    def from_factors(cls, name: str, kind: LayerKind, shape: tuple[int, ...], B: torch.Tensor, A: torch.Tensor,
                     bias: torch.Tensor | None = None) -> LoraModule:
        """The one constructor from factors: B (out, r) and A (r, in·k…) with ΔW = B@A in PEFT's
        orientation (for an embedding, out is the embedding dim and in the vocabulary), as a PEFT-layout
        LoRA with alpha = r (scale 1) for a weight of logical `shape` (conv kernels get their dims back)."""
        r = A.shape[0]
        if kind is not LayerKind.EMBEDDING and len(shape) > 2:
            kind = LayerKind.CONV
            A, B = A.reshape(r, *shape[1:]), B.reshape(shape[0], r, *[1] * (len(shape) - 2))
        return cls(name=name, kind=kind, lora_A=A.cpu().contiguous(), lora_B=B.cpu().contiguous(), alpha=float(r),
                   bias=None if bias is None else bias.cpu())

    @property
    def algorithm(self) -> str:
        """"locon" for a conv layer (LyCORIS' name for LoRA on convolutions), else "lora"."""
        return "locon" if self.kind is LayerKind.CONV else "lora"

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.lora_A.dtype

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.use_rslora)

    @property
    def plain_alpha(self) -> float:
        return plain_alpha(self.alpha, self.rank, self.use_rslora)

    @property
    def dora_axis(self) -> str | None:
        """PEFT's magnitude holds one value per output unit (per embedding dim for embeddings)."""
        return OUT if self.is_dora else None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_down.weight": self.lora_A, "lora_up.weight": self.lora_B}

    def named_tensors(self) -> dict[str, torch.Tensor]:
        parts = {"lora_A": self.lora_A, "lora_B": self.lora_B, "magnitude": self.magnitude, "lora_B.bias": self.bias}
        return {f"{self.name}.{part}": t for part, t in parts.items() if t is not None}

    def natural_shape(self) -> tuple[int, ...]:
        """The base weight as stored without HF `Conv1D` transposition: (vocab, dim) for an embedding."""
        A, B = self.lora_A, self.lora_B
        if self.kind is LayerKind.EMBEDDING:
            return (A.shape[1], B.shape[0])
        return (B.shape[0], *A.shape[1:])

    def fits(self, shape) -> bool:
        """Exact, or a 1×1 conv and a linear layer (the same map: SD1 stores `proj_in`/`proj_out` as 1×1
        convs where SD2/SDXL store linears, so factors of one kind fit a base weight of the other)."""
        natural, shape = self.natural_shape(), tuple(shape)
        return natural == shape or (self.kind is not LayerKind.EMBEDDING
                                    and _pointwise_2d(natural) == _pointwise_2d(shape))

    def orientations(self, shape) -> list[bool]:
        shape = tuple(shape)
        options = [False, True] if self.kind is LayerKind.LINEAR else [False]
        exact = [t for t in options if stored(self.natural_shape(), t) == shape]
        if exact or self.kind is LayerKind.EMBEDDING:
            return exact
        return [False] if self.fits(shape) else []

    def stored_transposed(self, transposed: bool) -> bool:
        return transposed or self.kind is LayerKind.EMBEDDING

    def factors(self, transposed: bool = False, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        A = self.lora_A.to(device=device, dtype=dtype or torch.float32)
        B = self.lora_B.to(device=device, dtype=dtype or torch.float32)
        if self.kind is LayerKind.CONV:
            return B.reshape(B.shape[0], -1), A.reshape(A.shape[0], -1)
        if self.stored_transposed(transposed):
            return A.T, B.T
        return B, A

    def unscaled_delta(self, dtype: torch.dtype, device) -> torch.Tensor:
        left, right = self.factors(False, device, dtype)
        return (left @ right).reshape(self.expected_base_shape())

    def delta(self, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
              transposed: bool = False) -> torch.Tensor:
        import torch

        left, right = self.factors(transposed, device, dtype or torch.float32)
        return (left @ right * self.scale).reshape(stored(self.expected_base_shape(), transposed))

    def bias_delta(self, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """s·lora_B.bias, as PEFT merges it (float32 by default)."""
        import torch

        return None if self.bias is None else self.scale * self.bias.to(device=device, dtype=dtype or torch.float32)

    def restricted(self, name: str, rows: Rows | None = None, swap: bool = False) -> LoraModule:
        """B's rows (and the bias' and magnitude's) cut to `rows`, halves swapped: exact per-part factors."""
        part = self.renamed(name)
        if rows is not None or swap:
            part.lora_B, part.bias, part.magnitude = (rows_of(t, rows, swap) for t in (self.lora_B, self.bias,
                                                                                      self.magnitude))
        return part
