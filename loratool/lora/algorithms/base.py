"""What every LyCORIS adapter module offers merge, inspect, convert and combine.

A subclass owns its tensor roles (the file suffixes without the dot), knows its natural ΔW shape
from the tensors alone, and builds the unscaled update; this base adds the scale, the reshape to the
base weight, DoRA, parameter counts and the inspect summary. `LoraModule` (lora/module.py) offers
the same members, so a caller never needs to know which class it holds.

A LyCORIS file stores some conv updates flattened (LoHa and LoKr without Tucker keep (out, in·kh·kw)
factors), so the kernel shape is not in the file. `fit_to(base_shape)` records the base weight's
shape once names are resolved; until then `expected_base_shape()` is the natural (possibly flat) one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

from ...errors import AdapterError, MismatchError
from ..module import LayerKind
from .dora import apply_lycoris_dora, dora_axis

if TYPE_CHECKING:
    import torch


def kind_of(shape) -> LayerKind:
    return {1: LayerKind.NORM, 2: LayerKind.LINEAR}.get(len(shape), LayerKind.CONV)


def shapes_fit(natural, shape) -> bool:
    """True when a ΔW of `natural` shape adds to a weight of `shape`: same shape, or a flattened kernel
    of it (same rows, same elements per row), or a 1×1 kernel on a matrix."""
    natural, shape = tuple(natural), tuple(shape)
    if natural == shape:
        return True
    if len(natural) < 2 or len(shape) < 2 or natural[0] != shape[0]:
        return False
    if math.prod(natural[1:]) != math.prod(shape[1:]):
        return False
    return min(len(natural), len(shape)) == 2 and (len(natural) == 2 or all(k == 1 for k in natural[2:]))


class AlgorithmModule:
    """Base of the LyCORIS module classes. Subclasses set `algorithm`, `roles`, and implement
    `tensors()`, `natural_shape()`, `unscaled_delta()`, `rank` and `scale`."""

    algorithm: ClassVar[str]
    #: Tensor roles this class owns, as the file suffix after `<module>.` (`.alpha`/`.dora_scale` are shared).
    roles: ClassVar[tuple[str, ...]]
    #: LyCORIS folds rsLoRA into the stored alpha, so the scale rule never needs the flag.
    use_rslora: ClassVar[bool] = False
    tucker: ClassVar[bool] = False
    #: LoKr's Kronecker split; None elsewhere.
    factor: ClassVar[list[int] | None] = None
    #: True for algorithms whose files store a k×k conv's factors over the flattened kernel (LoHa and
    #: LoKr without Tucker), so that a 2-D update may be a Linear or a flattened Conv2d.
    stores_convs_flat: ClassVar[bool] = False

    name: str
    alpha: float | None
    magnitude: torch.Tensor | None
    bias: torch.Tensor | None
    base_shape: tuple[int, ...] | None

    def __init__(self, name: str, alpha: float | None = None, magnitude: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None):
        self.name, self.alpha, self.magnitude, self.bias = name, alpha, magnitude, bias
        self.base_shape = None

    # -- to implement -------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Role -> tensor for the factors (not alpha, dora_scale or bias)."""
        raise NotImplementedError

    def natural_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def unscaled_delta(self, dtype: torch.dtype, device) -> torch.Tensor:
        raise NotImplementedError

    @property
    def rank(self) -> int | None:
        raise NotImplementedError

    @property
    def scale(self) -> float:
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    @property
    def dora_axis(self) -> str | None:
        """"out" (one magnitude per output unit, as PEFT) or "in" (per input channel); None without DoRA."""
        if self.magnitude is None:
            return None
        shape = self.expected_base_shape()
        if self.magnitude.shape[0] == shape[0] and self.magnitude.numel() == shape[0]:
            return "out"
        return "in"

    @property
    def kind(self) -> LayerKind:
        return kind_of(self.expected_base_shape())

    def expected_base_shape(self) -> tuple[int, ...]:
        return self.base_shape or self.natural_shape()

    def fits(self, shape) -> bool:
        return shapes_fit(self.natural_shape(), shape)

    @property
    def shape_ambiguous(self) -> bool:
        """True while the tensors alone cannot tell a Linear from a flattened Conv2d (a 2-D LoHa/LoKr
        update not yet `fit_to` a base weight); writers that need the layer's shape must refuse then."""
        return self.stores_convs_flat and self.base_shape is None and len(self.natural_shape()) == 2

    def fit_to(self, shape) -> None:
        """Adopt the base weight's shape (e.g. a conv kernel the file stored flattened)."""
        if not self.fits(shape):
            raise MismatchError(f"{self.name}: a {self.algorithm} update of shape {list(self.natural_shape())} "
                                f"does not fit the base weight {list(shape)}")
        if self.magnitude is not None:
            try:
                dora_axis(self.magnitude, tuple(shape))
            except MismatchError as e:
                raise MismatchError(f"{self.name}: {e}") from None
        self.base_shape = tuple(shape)

    def delta(self, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """ΔW, scaled, in the base weight's shape, computed in `dtype` (float32 by default)."""
        import torch

        dtype = dtype or torch.float32
        return (self.unscaled_delta(dtype, device) * self.scale).reshape(self.expected_base_shape())

    def bias_delta(self, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The update to add to the base bias as is (`.diff_b`, `.b_norm`, float32 by default), or None."""
        import torch

        return None if self.bias is None else self.bias.to(device=device, dtype=dtype or torch.float32)

    def apply_to(self, base: torch.Tensor) -> torch.Tensor:
        """The merged weight: W + ΔW, or LyCORIS' DoRA of it, in float32 (or wider if `base` is)."""
        import torch

        dtype = torch.promote_types(base.dtype, torch.float32)
        delta = self.delta(dtype, base.device).reshape(base.shape)
        if self.magnitude is None:
            return base.to(dtype) + delta
        return apply_lycoris_dora(base, delta, self.magnitude)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        named = dict(self.tensors())
        if self.magnitude is not None:
            named["dora_scale"] = self.magnitude
        if self.bias is not None and "diff_b" not in named and "b_norm" not in named:
            named["bias"] = self.bias
        return {f"{self.name}.{role}": t for role, t in named.items()}

    @property
    def parameter_count(self) -> int:
        return sum(t.numel() for t in self.named_tensors().values())

    def info(self) -> dict:
        return {"algorithm": self.algorithm, "kind": self.kind.value, "dora": self.is_dora, "rank": self.rank,
                "alpha": self.alpha, "scale": self.scale, "tucker": self.tucker, "factor": self.factor,
                "parameters": self.parameter_count, "shape": list(self.expected_base_shape())}

    def __repr__(self) -> str:
        shapes = ", ".join(f"{role}={list(t.shape)}" for role, t in self.tensors().items())
        return f"{type(self).__name__}({self.name!r}, {shapes}, scale={self.scale:g}, dora={self.is_dora})"


def alpha_or(alpha: float | None, rank: int) -> float:
    """LyCORIS' and kohya's rule: a missing or zero alpha means alpha = rank (scale 1)."""
    return float(rank) if not alpha else float(alpha)


def problem(name: str, algorithm: str, what: str) -> AdapterError:
    return AdapterError(f"{name}: {algorithm} module {what}")
