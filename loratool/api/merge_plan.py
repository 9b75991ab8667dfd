"""Plan a merge: which base tensors change, how, and into what dtype. Checks everything before any write."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..checkpoint import Checkpoint
from ..dtypes import MERGEABLE_FLOATS
from ..errors import MismatchError, NonFiniteError, UsageError, summarize
from ..lora.delta import expected_base_shape
from ..lora.module import Adapter, LoraModule
from ..lora.targeting import choose_orientation, fits, resolve_base_names

TIED_HEAD_NAMES = ("lm_head",)


@dataclass
class DeltaOp:
    module: LoraModule
    weight: float
    transposed: bool


@dataclass
class BiasOp:
    module: LoraModule
    weight: float


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
    base: Checkpoint,
    adapters: list[Adapter],
    weights: list[float],
    out_dtype: torch.dtype | None,
    allow_nonfinite: bool = False,
) -> MergePlan:
    config = base.config()
    model_type = config.get("model_type") if config else None
    plan = MergePlan()
    if not allow_nonfinite:
        check_finite(adapters)
    for adapter, weight in zip(adapters, weights):
        if adapter.use_dora and weight != 1.0:
            raise UsageError(
                f"{adapter.path} is a DoRA adapter, which only merges with weight 1: its magnitude rescales the "
                "whole weight, so it cannot be scaled or subtracted (unmerged) without the pre-merge weights"
            )
        _refuse_tied_head(list(adapter.modules) + list(adapter.full_tensors), base, config, adapter)
        mapping, unknown = resolve_base_names(adapter.modules, adapter.full_tensors, base)
        if unknown:
            raise MismatchError(f"{adapter.path} targets modules the base does not have: {summarize(unknown)}")
        _plan_modules(plan, base, adapter, weight, mapping, model_type)
        for name, tensor in adapter.full_tensors.items():
            plan.add(mapping[name], ReplaceOp(tensor=tensor, source=str(adapter.path), weight=weight))
    _check_plan(plan, base, out_dtype)
    return plan


def _plan_modules(plan: MergePlan, base: Checkpoint, adapter: Adapter, weight: float,
                  mapping: dict[str, str], model_type: str | None) -> None:
    candidates: dict[str, list[bool]] = {}
    clashes: list[str] = []
    for name, module in adapter.modules.items():
        base_shape = base[f"{mapping[name]}.weight"].shape
        options = fits(module, base_shape)
        if not options:
            clashes.append(
                f"{name}: base weight is {list(base_shape)} but the adapter fits {list(expected_base_shape(module))}"
            )
        candidates[name] = options
    if clashes:
        raise MismatchError(f"{adapter.path} does not fit the base: {summarize(clashes)}")
    orientation, note = choose_orientation(candidates, model_type, adapter.fan_in_fan_out)
    if note:
        plan.notes.append(f"{adapter.path}: {note}")
    for name, module in adapter.modules.items():
        target = mapping[name]
        plan.add(f"{target}.weight", DeltaOp(module=module, weight=weight, transposed=orientation[name]))
        if module.bias is not None:
            if f"{target}.bias" not in base:
                raise MismatchError(f"{adapter.path}: {name} has a lora_B.bias but the base module has no bias")
            plan.add(f"{target}.bias", BiasOp(module=module, weight=weight))


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
