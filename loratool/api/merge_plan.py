"""Plan a merge: which base tensors change, how, and into what dtype. Checks everything before any write."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..checkpoint import Checkpoint
from ..dtypes import MERGEABLE_FLOATS
from ..errors import MismatchError, NonFiniteError, UsageError, summarize
from ..lora.delta import expected_base_shape
from ..lora.algorithms import AdapterModule
from ..lora.module import Adapter, LoraModule
from ..layouts import BaseLayout, Piece
from ..lora.pieces import restrict
from ..lora.targeting import choose_orientation, fits, resolve_base_names

TIED_HEAD_NAMES = ("lm_head",)


@dataclass
class DeltaOp:
    """Add weight·ΔW of `module` to a base tensor; `rows` places it in a row range of a fused tensor.

    A LyCORIS module (dense ΔW) on a fused module keeps its own rows `lora_rows` of ΔW for this piece,
    with its halves swapped when `swap`; a LoRA arrives already restricted (`lora/pieces.py`)."""

    module: AdapterModule
    weight: float
    transposed: bool
    rows: tuple[int, int] | None = None
    lora_rows: tuple[int, int] | None = None
    swap: bool = False


@dataclass
class BiasOp:
    module: AdapterModule
    weight: float
    rows: tuple[int, int] | None = None
    lora_rows: tuple[int, int] | None = None
    swap: bool = False


@dataclass
class ReplaceOp:
    tensor: torch.Tensor
    source: str
    weight: float


@dataclass
class MergePlan:
    ops: dict[str, list] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, base_name: str, op) -> None:
        self.ops.setdefault(base_name, []).append(op)


def parse_weights(weights: list[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0] * count
    if len(weights) != count:
        raise UsageError(f"--weights has {len(weights)} values for {count} adapter(s); give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise UsageError(f"--weights must be finite numbers, got {weights}")
    return [float(w) for w in weights]


def check_finite(adapters: list[Adapter]) -> None:
    bad = [
        f"{adapter.path}: {name}"
        for adapter in adapters
        for name, tensor in adapter.named_tensors().items()
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if bad:
        raise NonFiniteError(f"NaN/Inf in adapter tensors: {summarize(bad)}; pass --allow-nonfinite to merge anyway")


def _ties_head(base: Checkpoint, config: dict | None) -> bool:
    if config and config.get("tie_word_embeddings") is True:
        return True
    return "lm_head.weight" not in base and any(k.endswith("embed_tokens.weight") or k.endswith("wte.weight") for k in base)


def _refuse_tied_head(names: list[str], base: Checkpoint, config: dict | None, adapter: Adapter) -> None:
    heads = [n for n in names if n.split(".")[-1] in TIED_HEAD_NAMES or n.split(".")[-2:-1] == ["lm_head"]]
    if heads and _ties_head(base, config):
        raise MismatchError(
            f"{adapter.path} targets {heads[0]}, but the base ties lm_head to the input embeddings "
            "(tie_word_embeddings), so the head has no weight of its own to merge into: a change to it would "
            "also change the embeddings. Untie the embeddings in the base first"
        )


def plan_merge(
    layout: BaseLayout,
    checkpoints: Mapping[str | None, Checkpoint],
    adapters: list[Adapter],
    weights: list[float],
    out_dtype: torch.dtype | None,
    allow_nonfinite: bool = False,
) -> dict[str | None, MergePlan]:
    """One plan per checkpoint of the base (one, or one per pipeline component), keyed like `checkpoints`."""
    plans = {source: MergePlan() for source in checkpoints}
    config = checkpoints[None].config() if None in checkpoints else None
    model_type = config.get("model_type") if config else None
    if not allow_nonfinite:
        check_finite(adapters)
    for adapter, weight in zip(adapters, weights):
        if adapter.use_dora and weight != 1.0:
            raise UsageError(
                f"{adapter.path} is a DoRA adapter, which only merges with weight 1: its magnitude rescales the "
                "whole weight, so it cannot be scaled or subtracted (unmerged) without the pre-merge weights"
            )
        resolved = layout.resolve(adapter.modules, flat=adapter.unresolved_names, source=adapter.path)
        if None in checkpoints:
            _refuse_tied_head(list(adapter.modules) + list(adapter.full_tensors), checkpoints[None], config, adapter)
        _plan_modules(plans, checkpoints, adapter, weight, resolved, model_type)
        _plan_full_tensors(plans, layout, checkpoints, adapter, weight)
    for source, plan in plans.items():
        _check_plan(plan, checkpoints[source], out_dtype)
    return plans


def _plan_full_tensors(plans: dict, layout: BaseLayout, checkpoints: Mapping[str | None, Checkpoint],
                       adapter: Adapter, weight: float) -> None:
    """modules_to_save and other whole tensors: matched by tensor name, through the module resolver."""
    if not adapter.full_tensors:
        return
    if None in checkpoints:
        mapping, unknown = resolve_base_names([], adapter.full_tensors, checkpoints[None])
        targets = {name: (None, base_name) for name, base_name in mapping.items()}
    else:
        targets, unknown = {}, []
        for name in adapter.full_tensors:
            module, _, param = name.rpartition(".")
            try:
                pieces = layout.resolve([module])[module]
            except MismatchError:
                pieces = ()
            if len(pieces) == 1 and pieces[0].target.rows is None and param in ("weight", "bias"):
                target = pieces[0].target
                targets[name] = (target.source, target.weight if param == "weight" else target.bias)
            else:
                unknown.append(name)
    if unknown:
        raise MismatchError(f"{adapter.path} carries whole tensors the base does not have: {summarize(unknown)}")
    for name, tensor in adapter.full_tensors.items():
        source, base_name = targets[name]
        plans[source].add(base_name, ReplaceOp(tensor=tensor, source=str(adapter.path), weight=weight))


def _dense_options(module, shape: tuple[int, ...], lora_rows, transposed: bool | None) -> list[bool]:
    """The orientations in which a LyCORIS module's ΔW (its `lora_rows` when given) adds to `shape`."""
    natural = tuple(module.natural_shape())
    rows = lora_rows[1] - lora_rows[0] if lora_rows else natural[0]
    options = [False, True] if transposed is None else [transposed]
    fitting = []
    for option in options:
        if option and (len(shape) != 2 or len(natural) != 2):
            continue
        oriented = tuple(reversed(shape)) if option else tuple(shape)
        if oriented[0] == rows and module.fits((natural[0], *oriented[1:])):
            fitting.append(option)
    return fitting


def _plan_modules(plans: dict, checkpoints: Mapping[str | None, Checkpoint], adapter: Adapter, weight: float,
                  resolved: dict[str, tuple[Piece, ...]], model_type: str | None) -> None:
    candidates: dict[str, list[bool]] = {}
    pieces: dict[str, tuple] = {}
    clashes: list[str] = []
    for name, module in adapter.modules.items():
        for piece in resolved[name]:
            target = piece.target
            base_shape = checkpoints[target.source][target.weight].shape
            if target.rows is not None:
                base_shape = (target.rows[1] - target.rows[0], *base_shape[1:])
            swap = piece.swap_lora != target.swap_halves
            if isinstance(module, LoraModule):
                part = restrict(module, name if len(resolved[name]) == 1 else piece.module, piece.lora_rows, swap)
                options = fits(part, base_shape)
                if target.transposed is not None:
                    options = [t for t in options if t == target.transposed]
                expected = expected_base_shape(part, bool(target.transposed))
            else:
                part = module
                options = _dense_options(module, base_shape, piece.lora_rows, target.transposed)
                expected = module.natural_shape()
            if not options:
                clashes.append(f"{part.name}: base {target.weight} is {list(base_shape)} but the {module.algorithm} "
                               f"update fits {list(expected)}")
            if module.is_dora and (target.rows is not None or piece.lora_rows is not None):
                clashes.append(f"{name}: DoRA on a fused tensor ({target.weight}) is not supported")
            key = f"{name}\0{piece.module}"
            candidates[key] = options
            pieces[key] = (part, piece, swap, base_shape)
    if clashes:
        raise MismatchError(f"{adapter.path} does not fit the base: {summarize(clashes)}")
    orientation, note = choose_orientation(candidates, model_type, adapter.fan_in_fan_out)
    for key, (part, piece, swap, base_shape) in pieces.items():
        target, plan = piece.target, plans[piece.target.source]
        if note and not plan.notes:
            plan.notes.append(f"{adapter.path}: {note}")
        transposed = orientation[key]
        dense = {} if isinstance(part, LoraModule) else {"lora_rows": piece.lora_rows, "swap": swap}
        if dense:
            oriented = tuple(reversed(base_shape)) if transposed else tuple(base_shape)
            part.fit_to((part.natural_shape()[0], *oriented[1:]))
        plan.add(target.weight, DeltaOp(module=part, weight=weight, transposed=transposed, rows=target.rows, **dense))
        if part.bias is not None:
            if target.bias is None:
                raise MismatchError(f"{adapter.path}: {part.name} has a bias update but the base module has no bias")
            plan.add(target.bias, BiasOp(module=part, weight=weight, rows=target.rows, **dense))


def _check_plan(plan: MergePlan, base: Checkpoint, out_dtype: torch.dtype | None) -> None:
    problems: list[str] = []
    for name, ops in plan.ops.items():
        info = base[name]
        if info.torch_dtype not in MERGEABLE_FLOATS:
            problems.append(f"{name} is stored as {info.dtype}; dequantize the base before merging into it")
        replacements = [op for op in ops if isinstance(op, ReplaceOp)]
        if len(replacements) > 1:
            problems.append(f"{name} is replaced by several adapters ({', '.join(op.source for op in replacements)})")
        for op in replacements:
            if tuple(op.tensor.shape) != info.shape:
                problems.append(
                    f"{name}: {op.source} carries a {list(op.tensor.shape)} tensor for a {list(info.shape)} base "
                    "tensor (a resized vocabulary? resize the base first)"
                )
        if replacements and ops[0] is not replacements[0]:
            ops.remove(replacements[0])
            ops.insert(0, replacements[0])
    if problems:
        raise MismatchError(summarize(problems))
