"""The one interface of every adapter module (LoRA, LoCon, LoHa, LoKr, full diffs), with DoRA on top.

A subclass owns its tensor roles (the file suffixes without the dot), knows its natural ΔW shape from
the tensors alone, and builds the unscaled update; where its ΔW is a product of two factors it also
gives them (`factors`), so merge can stream it without forming ΔW. This base adds the scale (from
`lora/scaling.py`), the orientation rule against a base weight, the restriction to a piece of a fused
weight, the merge itself (DoRA through one shared helper), parameter counts and the inspect summary.
Code outside `loratool/lora/` uses only these members, never the class.

Shapes: the *logical* weight is (out, in, k…). A base may store a matrix transposed (HF `Conv1D`,
(in, out)): every method that touches the stored weight takes `transposed` for that. A LyCORIS file
stores some conv updates flattened (LoHa and LoKr without Tucker keep (out, in·kh·kw) factors), so the
kernel shape is not in the file: `fit_to(shape)` records the base weight's logical shape once names
are resolved, and until then `expected_base_shape()` is the natural (possibly flat) one.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, ClassVar

from ...errors import AdapterError, MismatchError
from ..kinds import LayerKind
from .dora import IN, OUT, apply_dora_, dora_axis

if TYPE_CHECKING:
    import torch

Rows = tuple[int, int]


#: |scale| beyond this is refused: no trainer writes it, and it would turn any merge into overflow.
MAX_SCALE = 1e6


def dtype_of(tensor) -> tuple[str, bool]:
    """(the dtype's name, whether it is a float8) for a torch tensor (`float8_e4m3fn`) or a header tensor
    (`F8_E4M3`) alike."""
    name = str(tensor.dtype).removeprefix("torch.")
    return name, "float8" in name or name.startswith("F8")


def tensor_problem(role: str, tensor) -> str | None:
    """Why `tensor` cannot hold the adapter role `role` (a factor, dora_scale or bias), or None: it must
    be a float tensor of at least one dimension with at least one element (no rank-0 factors), and not
    float8, which no trainer writes factors in. Works on torch tensors and header tensors alike."""
    dtype, float8 = dtype_of(tensor)
    if float8:
        return f".{role} is stored as {dtype}; float8 adapter tensors are not supported (save it in bf16/fp16/fp32)"
    if not tensor.is_floating_point():
        return f".{role} is {dtype}, not a float tensor"
    if tensor.dim() == 0:
        return f".{role} is a 0-dim scalar, not a tensor of its layer's shape"
    if tensor.numel() == 0:
        return f".{role} is empty {list(tensor.shape)} (rank 0?)"
    return None


def check_tensors(name: str, algorithm: str, tensors: dict) -> None:
    """Refuse, in one line naming the module, the tensor and the rule, the first unusable tensor."""
    for role, tensor in tensors.items():
        if tensor is not None and (why := tensor_problem(role, tensor)):
            raise AdapterError(f"{name}: {algorithm} module {why}")


def check_scale(module: AdapterModule) -> None:
    """Alphas are real, finite numbers and scales finite and sane, before any of them is used."""
    alpha, scale = module.alpha, module.scale
    if alpha is not None and (not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha)):
        raise AdapterError(f"{module.name}: alpha {alpha!r} is not a finite number")
    if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
        raise AdapterError(f"{module.name}: scale {scale!r} (alpha {alpha!r}, rank {module.rank}) is not finite or "
                           f"beyond ±{MAX_SCALE:g}; the adapter is broken")


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


def stored(shape: tuple[int, ...], transposed: bool) -> tuple[int, ...]:
    """A logical weight shape as the base stores it (HF `Conv1D` matrices are (in, out))."""
    return tuple(reversed(shape)) if transposed and len(shape) == 2 else tuple(shape)


class AdapterModule:
    """Base of the adapter module classes. Subclasses set `algorithm`, `roles`, and implement
    `tensors()`, `natural_shape()`, `unscaled_delta()`, `rank` and `scale`; `factors()` where ΔW is a
    product of two factors."""

    algorithm: ClassVar[str]
    #: Tensor roles this class owns, as the kohya/LyCORIS file suffix after `<module>.` (`.alpha` and
    #: `.dora_scale` are shared by all).
    roles: ClassVar[tuple[str, ...]]
    use_rslora: ClassVar[bool] = False
    tucker: ClassVar[bool] = False
    #: LoKr's Kronecker split; None elsewhere.
    factor: ClassVar[list[int] | None] = None
    #: True for algorithms whose files store a k×k conv's factors over the flattened kernel (LoHa and
    #: LoKr without Tucker), so that a 2-D update may be a Linear or a flattened Conv2d.
    stores_convs_flat: ClassVar[bool] = False
    #: True for a plain LoRA (A, B, alpha, PEFT's DoRA, a lora_B bias): what PEFT LoRA, diffusers and kohya
    #: LoRA files hold, and what splits into per-part LoRAs on a fused tensor (other modules merge there
    #: through their dense ΔW, and need `--rank` to be written).
    plain_lora: ClassVar[bool] = False
    #: The base weight's logical shape once `fit_to` has recorded it.
    base_shape: tuple[int, ...] | None = None

    name: str
    alpha: float | None
    magnitude: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(self, name: str, alpha: float | None = None, magnitude: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None):
        self.name, self.alpha, self.magnitude, self.bias = name, alpha, magnitude, bias

    # -- to implement -------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Role -> tensor for the factors (not alpha, dora_scale or bias), as a kohya/LyCORIS file names them."""
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

    #: True when ΔW is a product of two factors, which `factors` then returns.
    factored: ClassVar[bool] = False

    def factors(self, transposed: bool = False, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(left, right) in `dtype` (float32 by default) with ΔW = scale · left @ right on the stored weight's 2-D view (conv
        kernels flattened into columns), or None when ΔW is not such a product (LoHa, LoKr, full diffs)."""
        return None

    # -- shared -------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The dtype the module's factors are stored in."""
        return next(iter(self.tensors().values())).dtype

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    @property
    def dora_axis(self) -> str | None:
        """"out" (one magnitude per output unit, as PEFT) or "in" (per input channel); None without DoRA."""
        if self.magnitude is None:
            return None
        out = self.expected_base_shape()[0]
        return OUT if self.magnitude.shape[0] == out and self.magnitude.numel() == out else IN

    @property
    def kind(self) -> LayerKind:
        return kind_of(self.expected_base_shape())

    @property
    def plain_alpha(self) -> float | None:
        """The alpha giving the same scale without rsLoRA, for formats with no rsLoRA flag."""
        return self.alpha

    def expected_base_shape(self) -> tuple[int, ...]:
        """The base weight's logical shape (out, in, k…): as fitted, else the natural one."""
        return self.base_shape or self.natural_shape()

    def fits(self, shape) -> bool:
        """Whether ΔW adds to a weight of logical `shape`."""
        return shapes_fit(self.natural_shape(), shape)

    def orientations(self, shape) -> list[bool]:
        """The ways ΔW adds to a base weight stored as `shape`: False as (out, in, k…), True as HF
        `Conv1D`'s (in, out). The one rule for orientation; the resolver picks among these."""
        shape = tuple(shape)
        options = [False, True] if len(shape) == 2 and len(self.natural_shape()) == 2 else [False]
        return [t for t in options if self.fits(stored(shape, t))]

    @property
    def shape_ambiguous(self) -> bool:
        """True while the tensors alone cannot tell a Linear from a flattened Conv2d (a 2-D LoHa/LoKr
        update not yet `fit_to` a base weight); writers that need the layer's shape must refuse then."""
        return self.stores_convs_flat and self.base_shape is None and len(self.natural_shape()) == 2

    def fit_to(self, shape) -> None:
        """Adopt the base weight's logical shape (e.g. a conv kernel the file stored flattened)."""
        if not self.fits(shape):
            raise MismatchError(f"{self.name}: a {self.algorithm} update of shape {list(self.natural_shape())} "
                                f"does not fit the base weight {list(shape)}")
        if self.magnitude is not None:
            try:
                dora_axis(self.magnitude, tuple(shape))
            except MismatchError as e:
                raise MismatchError(f"{self.name}: {e}") from None
        self.base_shape = tuple(shape)

    def renamed(self, name: str) -> AdapterModule:
        """A shallow copy under another name (the tensors are shared)."""
        copied = copy.copy(self)
        copied.name = name
        return copied

    def restricted(self, name: str, rows: Rows | None = None, swap: bool = False) -> AdapterModule:
        """The module as it acts on rows [start, stop) of its output (then with the two row halves
        swapped when `swap`), renamed: one piece of a fused base tensor (Flux `qkv`)."""
        if rows is None and not swap:
            return self.renamed(name)
        return OutputRows(self, name, rows, swap)

    def delta(self, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
              transposed: bool = False) -> torch.Tensor:
        """ΔW, scaled, in the stored weight's shape, computed in `dtype` (float32 by default)."""
        import torch

        dtype = dtype or torch.float32
        logical = (self.unscaled_delta(dtype, device) * self.scale).reshape(self.expected_base_shape())
        return logical.T if transposed and logical.dim() == 2 else logical

    def bias_delta(self, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The update to add to the base bias (float32 by default), or None."""
        import torch

        return None if self.bias is None else self.bias.to(device=device, dtype=dtype or torch.float32)

    def stored_transposed(self, transposed: bool) -> bool:
        """Whether the stored weight is the logical one transposed (embeddings' LoRA overrides this)."""
        return transposed

    @property
    def streams(self) -> bool:
        """Whether merge can add ΔW a block of rows at a time from `factors` (no DoRA, factors exist)."""
        return self.magnitude is None and self.factored

    def merge_into(self, acc: torch.Tensor, unmerged: torch.Tensor, weight: float = 1.0,
                   transposed: bool = False) -> None:
        """acc ← acc + weight·ΔW, or the DoRA of it, in place. `acc` and `unmerged` are the stored
        weight (or the rows of a fused weight this module covers) in float32 or wider; `unmerged` is
        the weight before any adapter, over which DoRA takes its norm."""
        from ..delta import as_2d

        if self.magnitude is not None:
            delta = self.delta(acc.dtype, acc.device, transposed)
            apply_dora_(acc, unmerged, delta, self.magnitude, self.dora_axis, self.stored_transposed(transposed))
            return
        pair = self.factors(transposed, acc.device, acc.dtype)
        if pair is not None:
            as_2d(acc).addmm_(pair[0], pair[1], alpha=weight * self.scale)
        else:
            acc.add_(self.delta(acc.dtype, acc.device, transposed).reshape(acc.shape), alpha=weight)

    def apply_to(self, base: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """The merged weight W + ΔW (or the DoRA of it) in float32, or wider if `base` is."""
        import torch

        merged = base.to(torch.promote_types(base.dtype, torch.float32), copy=True)
        self.merge_into(merged, merged.clone() if self.is_dora else merged, 1.0, transposed)
        return merged

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


# --- pieces of fused tensors ----------------------------------------------------------------------------
# Any adapter module restricted to one piece of a fused base tensor (Flux `qkv`, OpenCLIP
# `in_proj_weight`): the rows [start, stop) of its output, then with the two row halves swapped.
# A LoRA splits exactly into per-part LoRAs (`LoraModule.restricted` cuts B's rows). Other algorithms
# (LoHa's Hadamard product, LoKr's Kronecker product) have no per-part factorisation of their own kind,
# so their piece is the `OutputRows` view: it merges through its rows of the dense ΔW, converts to LoRA
# with `--rank`, and refuses to be written as tensors of its own algorithm.


def rows_of(tensor: torch.Tensor | None, rows: Rows | None, swap: bool) -> torch.Tensor | None:
    """Rows [start, stop) of a tensor, then its two row halves swapped when `swap`; None stays None."""
    import torch

    if tensor is None:
        return None
    if rows is not None:
        tensor = tensor[rows[0]:rows[1]]
    if swap:
        half = tensor.shape[0] // 2
        tensor = torch.cat([tensor[half:], tensor[:half]])
    return tensor.contiguous()


class OutputRows(AdapterModule):
    """`inner` as it acts on its output rows `rows` (halves swapped when `swap`)."""

    roles = ()

    def __init__(self, inner: AdapterModule, name: str, rows: Rows | None, swap: bool):
        super().__init__(name, inner.alpha, inner.magnitude, None)
        self.inner, self.rows, self.swap = inner, rows, swap
        self.bias = rows_of(inner.bias, rows, swap)

    @property
    def algorithm(self) -> str:
        return self.inner.algorithm

    @property
    def tucker(self) -> bool:
        return self.inner.tucker

    @property
    def factor(self) -> list[int] | None:
        return self.inner.factor

    @property
    def factored(self) -> bool:
        return self.inner.factored

    @property
    def stores_convs_flat(self) -> bool:
        return self.inner.stores_convs_flat

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    @property
    def rank(self) -> int | None:
        return self.inner.rank

    @property
    def scale(self) -> float:
        return self.inner.scale

    def tensors(self) -> dict[str, torch.Tensor]:
        raise AdapterError(f"{self.inner.name}: a {self.algorithm} module on a fused tensor cannot be split into "
                           f"per-part {self.algorithm} modules for {self.name}; convert it with --rank to plain LoRA "
                           "first")

    def natural_shape(self) -> tuple[int, ...]:
        out, *rest = self.inner.expected_base_shape()
        rows = self.rows[1] - self.rows[0] if self.rows else out
        return (rows, *rest)

    def fit_to(self, shape) -> None:
        if self.inner.base_shape is None:
            self.inner.fit_to((self.inner.natural_shape()[0], *tuple(shape)[1:]))
        super().fit_to(shape)

    def unscaled_delta(self, dtype: torch.dtype, device) -> torch.Tensor:
        whole = self.inner.unscaled_delta(dtype, device).reshape(self.inner.expected_base_shape())
        return rows_of(whole, self.rows, self.swap)

    def factors(self, transposed: bool = False, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
        pair = self.inner.factors(False, device, dtype)
        if pair is None:
            return None
        left, right = rows_of(pair[0], self.rows, self.swap), pair[1]
        return (right.T, left.T) if transposed else (left, right)

    def bias_delta(self, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor | None:
        return rows_of(self.inner.bias_delta(dtype, device), self.rows, self.swap)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{self.name}.{key[len(self.inner.name) + 1:]}": t for key, t in self.inner.named_tensors().items()}


def problem(name: str, algorithm: str, what: str) -> AdapterError:
    return AdapterError(f"{name}: {algorithm} module {what}")


__all__ = ["OUT", "AdapterModule", "OutputRows", "kind_of", "problem", "shapes_fit", "stored"]
