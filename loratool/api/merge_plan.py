"""Plan a merge: which base tensors change, how, and into what dtype. Checks everything before any write."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..checkpoint import Checkpoint
from ..dtypes import MERGEABLE_FLOATS
from ..errors import MismatchError, UsageError, summarize
from ..layouts import BaseLayout
from ..lora.algorithms import AdapterModule
from ..lora.module import Adapter
from ..lora.targeting import OUTPUT_HEAD_LEAVES, head_is_tied, leaf, resolve_base_names
from ..options import check_finite
from ..quant import is_opaque
from ..resolve import resolve


@dataclass
class DeltaOp:
    """Add weight·ΔW of `module` (already restricted to its piece and fitted, `resolve.py`) to a base
    tensor; `rows` places it in a row range of a fused tensor."""

    module: AdapterModule
    weight: float
    transposed: bool
    rows: tuple[int, int] | None = None


@dataclass
class BiasOp:
    module: AdapterModule
    weight: float
    rows: tuple[int, int] | None = None


@dataclass
class ReplaceOp:
    tensor: torch.Tensor
    source: str
    weight: float


@dataclass
class MergePlan:
    ops: dict[str, list] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: Adapter modules left out with `skip_missing`, as "adapter: module" (kept on the first plan).
    skipped: list[str] = field(default_factory=list)

    def add(self, base_name: str, op) -> None:
        self.ops.setdefault(base_name, []).append(op)


def _refuse_tied_head(names: list[str], base: Checkpoint, config: dict | None, adapter: Adapter) -> None:
    heads = [n for n in names if leaf(n.removesuffix(".weight")) in OUTPUT_HEAD_LEAVES]
    if heads and head_is_tied(config, base):
        raise MismatchError(
            f"{adapter.path} targets {heads[0]}, but the base ties its output head to the input embeddings "
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
    skip_missing: bool = False,
) -> dict[str | None, MergePlan]:
    """One plan per checkpoint of the base (one, or one per pipeline component), keyed like `checkpoints`."""
    plans = {source: MergePlan() for source in checkpoints}
    config = layout.config
    if not allow_nonfinite:
        check_finite(adapters)
    for adapter, weight in zip(adapters, weights):
        if adapter.use_dora and weight != 1.0:
            raise UsageError(
                f"{adapter.path} is a DoRA adapter, which only merges with weight 1: its magnitude rescales the "
                "whole weight, so it cannot be scaled or subtracted (unmerged) without the pre-merge weights"
            )
        if None in checkpoints:
            _refuse_tied_head(list(adapter.modules) + list(adapter.full_tensors), checkpoints[None], config, adapter)
        skipped = _plan_modules(plans, adapter, weight, layout, skip_missing)
        next(iter(plans.values())).skipped.extend(f"{adapter.path}: {name}" for name in skipped)
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


def _plan_modules(plans: dict, adapter: Adapter, weight: float, layout: BaseLayout, skip_missing: bool) -> list[str]:
    """Add the adapter's ops to the plans; returns the modules left out with `skip_missing`."""
    resolution = resolve(adapter, layout, canonical_names=False, skip_missing=skip_missing)
    if resolution.notes:  # kept once, on the plan of the first base tensor it concerns
        plans[resolution.landings[0].piece.target.source].notes.extend(resolution.notes)
    for landing in resolution.landings:
        target, part = landing.piece.target, landing.module
        plan = plans[target.source]
        plan.add(target.weight, DeltaOp(module=part, weight=weight, transposed=landing.transposed, rows=target.rows))
        if part.bias is not None:
            plan.add(target.bias, BiasOp(module=part, weight=weight, rows=target.rows))
    return resolution.skipped


def _check_plan(plan: MergePlan, base: Checkpoint, out_dtype: torch.dtype | None) -> None:
    problems: list[str] = []
    for name, ops in plan.ops.items():
        info = base[name]
        if is_opaque(info):
            problems.append(f"{name} is stored in ComfyUI's {info.encoding.storage} format, which loratool cannot "
                            "requantize; merge into the bf16 or FP8 model instead")
        elif info.torch_dtype not in MERGEABLE_FLOATS:
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
