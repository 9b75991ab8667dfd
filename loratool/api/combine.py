"""`combine`: several adapters into one PEFT adapter, on the true deltas (see `lora/combine.py`)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint.output import atomic_output, check_output_path, read_paths
from ..distributed.options import ScaleOut
from ..distributed.runner import ProgressCallback
from ..dtypes import parse_output_dtype
from ..errors import AdapterError, MismatchError, UsageError, summarize
from ..formats.adapters import read_for_peft_output
from ..formats.peft import fill_missing_biases, write_peft_adapter
from ..lora.combine import DenseOptions, Term, dense_combine, stacked_factors
from ..lora.methods import METHODS, MajoritySign
from ..lora.algorithms import LoraModule
from ..lora.delta import COMPUTE_DTYPE
from ..lora.module import Adapter
from ..lora.svd import RankRule, relative_error, split_factors, truncate_factored
from ..lora.targeting import compact_target_modules
from ..lora.conversion import lora_problems
from ..lora.to_lora import dense_lora, logical_shape
from ..options import parse_weights, resolve_device

#: Config keys that restrict targets in ways a union of adapters cannot keep; their presence makes the
#: output list full module names instead.
NARROWING_KEYS = ("layers_to_transform", "layers_pattern", "exclude_modules")


@dataclass
class CombinedModule:
    name: str
    kind: str
    ranks_in: list[int | None]
    rank: int
    relative_error: float | None

    def to_json(self) -> dict:
        error = None if self.relative_error is None else round(self.relative_error, 6)
        return {"name": self.name, "kind": self.kind, "ranks_in": self.ranks_in, "rank": self.rank,
                "relative_error": error}


@dataclass
class CombineResult:
    output: Path
    method: str
    adapters: list[str]
    weights: list[float]
    modules: list[CombinedModule]
    parameters: int
    adapter_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    #: With `ray`: where the tasks ran (`ClusterReport.to_json()`).
    cluster: dict | None = None

    def to_json(self) -> dict:
        return {
            "output": str(self.output),
            "method": self.method,
            "adapters": self.adapters,
            "weights": self.weights,
            "modules": [m.to_json() for m in self.modules],
            "parameters": self.parameters,
            "adapter_bytes": self.adapter_bytes,
            "seconds": round(self.seconds, 3),
            "notes": self.notes,
            "cluster": self.cluster,
        }


@dataclass(frozen=True)
class CombineSpec:
    """The checked options of one combine run; `seed` seeds DARE's masks and the randomized SVD, per
    module name."""

    method: str
    rank: int | None
    dense: DenseOptions | None
    seed: int = 0

    @classmethod
    def parse(cls, method: str, rank: int | None, density: float | None, majority_sign: str,
              seed: int) -> CombineSpec:
        if method not in METHODS:
            raise UsageError(f"unknown --method {method!r}; choose one of: {', '.join(METHODS)}")
        if rank is not None and rank <= 0:
            raise UsageError(f"--rank must be a positive integer, got {rank}")
        if method == "cat" and rank is not None:
            raise UsageError("cat is exact (rank Σrᵢ) and takes no --rank; use --method svd for a rank-R result")
        if majority_sign not in ("total", "frequency"):
            raise UsageError(f"--majority-sign must be total or frequency, got {majority_sign!r}")
        if METHODS[method].kind == "dense":
            if density is None:
                raise UsageError(f"--method {method} needs --density (the fraction of each ΔW to keep, e.g. 0.5)")
            if not 0 < density <= 1:
                raise UsageError(f"--density must be a fraction in (0, 1], got {density}")
            return cls(method, rank, DenseOptions(density, majority_sign, seed), seed)
        if density is not None:
            raise UsageError(f"--density applies to ties, dare_linear, dare_ties and magnitude_prune, not {method}")
        return cls(method, rank, None, seed)

    @property
    def exact(self) -> bool:
        return self.method == "cat" or (self.method == "linear" and self.rank is None)


def _check_inputs(adapters: list[Adapter], spec: CombineSpec) -> None:
    dora = [str(a.path) for a in adapters if a.use_dora]
    if dora:
        raise AdapterError(
            f"cannot combine DoRA adapters ({summarize(dora)}): each one's magnitude vector rescales its own "
            "W + ΔW, so no single adapter reproduces a mix of them. Merge them into the base in turn instead"
        )
    if spec.dense is not None:
        biased = [str(a.path) for a in adapters if any(m.bias is not None for m in a.modules.values())]
        if biased:
            raise AdapterError(f"{spec.method} prunes ΔW entries and has no rule for lora_B biases ({summarize(biased)}); "
                               "use linear, cat or svd")
    _check_algorithms(adapters, spec)
    problems = []
    for name in sorted({n for a in adapters for n in a.modules}):
        found = [a.modules[name] for a in adapters if name in a.modules]
        layouts = {(m.kind, *_shape(m)) for m in found}
        if len(layouts) > 1:
            shapes = " vs ".join(f"{m.kind.value} {[_shape(m)[0], *_shape(m)[1]]}" for m in found)
            problems.append(f"{name}: {shapes}")
    if problems:
        raise MismatchError(f"the adapters disagree on module shapes, so they are for different models: {summarize(problems)}")


def _shape(module) -> tuple[int, tuple[int, ...]]:
    """(out, the rest of the weight's shape) as the combined LoRA will have it."""
    shape = logical_shape(module)
    return shape[0], tuple(shape[1:])


def _check_algorithms(adapters: list[Adapter], spec: CombineSpec) -> None:
    """LyCORIS modules without factors (LoHa, LoKr, full diffs) have no LoRA factors: only the methods
    defined on the dense ΔW take them, and the output rank must be given (their ΔW's rank is not r)."""
    lycoris = {f"{m.algorithm} ({a.path})" for a in adapters for m in a.modules.values() if not m.factored}
    if not lycoris:
        return
    held = summarize(sorted(lycoris), 3)
    if spec.exact:
        raise AdapterError(f"{spec.method} without --rank stacks LoRA factors, and {held} modules have none: use "
                           "--method svd --rank R (or linear --rank R), which work on each module's ΔW")
    if spec.rank is None:
        raise UsageError(f"combining {held} modules approximates their ΔW as LoRA: give the output --rank R")
    problems = [p for a in adapters for p in lora_problems(a.modules)]
    if problems:
        raise AdapterError(f"cannot combine into LoRA: {summarize(problems)}")


def _full_tensors(adapters: list[Adapter], weights: list[float], notes: list[str]) -> dict[str, torch.Tensor]:
    """modules_to_save and other whole tensors: one source per key; differing copies are refused."""
    carried: dict[str, tuple[torch.Tensor, Adapter]] = {}
    clashes, unscaled = [], []
    for adapter, weight in zip(adapters, weights):
        for key, tensor in adapter.full_tensors.items():
            if key in carried and not torch.equal(carried[key][0], tensor):
                clashes.append(f"{key} ({carried[key][1].path} vs {adapter.path})")
                continue
            carried.setdefault(key, (tensor, adapter))
            if weight != 1:
                unscaled.append(key)
    if clashes:
        raise AdapterError(
            f"several adapters replace the same tensor with different values (modules_to_save): {summarize(clashes)}; "
            "a replacement cannot be mixed, so combine adapters that do not both train it"
        )
    if unscaled:
        notes.append(f"whole tensors are carried over as they are, not weighted: {summarize(unscaled)}")
    return {key: tensor for key, (tensor, _) in carried.items()}


def _output_config(adapters: list[Adapter], module_names: list[str], notes: list[str]) -> dict:
    configs = [a.config for a in adapters]
    lists = [c.get("target_modules") for c in configs]
    if all(isinstance(t, list) for t in lists) and not any(c.get(k) for c in configs for k in NARROWING_KEYS):
        targets = sorted({t for targets in lists for t in targets})
    else:
        targets = compact_target_modules(module_names)
    bases = {c.get("base_model_name_or_path") for c in configs} - {None}
    if len(bases) > 1:
        notes.append(f"the adapters name different base models ({summarize(sorted(bases))}); kept the first")
    first = lambda key: next((c[key] for c in configs if c.get(key) not in (None, "none")), None)  # noqa: E731
    saved = sorted({m for c in configs for m in (c.get("modules_to_save") or [])})
    return {
        "base_model_name_or_path": first("base_model_name_or_path"),
        "task_type": first("task_type"),
        "target_modules": targets,
        "modules_to_save": saved or None,
        "fan_in_fan_out": any(c.get("fan_in_fan_out") for c in configs),
        "bias": first("bias") or "none",
    }


def _combine_module(name: str, terms: list[Term], spec: CombineSpec, device: torch.device,
                    dtype: torch.dtype | None) -> tuple[LoraModule, float | None]:
    """The combined module (scale 1, PEFT layout) and its compression error (None when exact)."""
    if any(not t.module.factored for t in terms):
        return _combine_dense_module(name, terms, spec, device, dtype)
    template = terms[0].module
    out_dtype = dtype or template.dtype
    error: float | None = None
    if spec.exact:
        B, A = (f.to(out_dtype) for f in stacked_factors(terms))
    elif spec.dense is None:
        rank = spec.rank or max(t.module.rank for t in terms)
        left, right = stacked_factors(terms)
        B, A, error = truncate_factored(left, right, RankRule(rank=rank), out_dtype)
    else:
        target = dense_combine(spec.method, [t.delta(device) for t in terms], [t.weight for t in terms], spec.dense,
                               name)
        rank = spec.rank or max(t.module.rank for t in terms)
        U, S, Vh = RankRule(rank=rank, seed=spec.seed).for_tensor(name).factorize(target)
        B, A = (f.to(out_dtype) for f in split_factors(U, S, Vh))
        error = relative_error(target, B.float(), A.float())
    bias = _weighted_bias(terms, out_dtype)
    return LoraModule.from_factors(name, template.kind, logical_shape(template), B, A, bias), error


def _weighted_bias(terms: list[Term], dtype: torch.dtype) -> torch.Tensor | None:
    """Σ wᵢ·(each module's bias update), or None when no module has one."""
    biases = [t.weight * bias for t in terms if (bias := t.module.bias_delta(COMPUTE_DTYPE)) is not None]
    return sum(biases).to(dtype) if biases else None


def _combine_dense_module(name: str, terms: list[Term], spec: CombineSpec, device: torch.device,
                          dtype: torch.dtype | None) -> tuple[LoraModule, float]:
    """A module some of whose inputs are LyCORIS modules: the method on the dense ΔWᵢ (a weighted sum for
    svd and linear), then the best rank-`spec.rank` LoRA of the result (scale 1, PEFT layout)."""
    deltas = [t.delta(device) for t in terms]
    if spec.dense is None:
        target = sum(t.weight * d for t, d in zip(terms, deltas))
    else:
        target = dense_combine(spec.method, deltas, [t.weight for t in terms], spec.dense, name)
    first = terms[0].module
    out_dtype = dtype or first.dtype
    return dense_lora(name, target, logical_shape(first), RankRule(rank=spec.rank, seed=spec.seed).for_tensor(name),
                      out_dtype,
                      _weighted_bias(terms, out_dtype), first.kind)


def combine(
    adapters: Sequence[str | os.PathLike | Adapter],
    output: str | os.PathLike,
    method: str,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    density: float | None = None,
    majority_sign: MajoritySign = "total",
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    force: bool = False,
    allow_pickle: bool = False,
    adapter_format: str | None = None,
    alpha: float | None = None,
    base: str | os.PathLike | None = None,
    ray: str | None = None,
    gpus_per_task: float | None = None,
    progress: ProgressCallback | None = None,
) -> CombineResult:
    """Combine `adapters` with `method` into one PEFT adapter at `output`.

    A module missing from an adapter counts as zero there. Every output module has scale 1
    (lora_alpha = r), so the weights and each input's own scale are applied exactly once, in B.
    With `ray`, balanced groups of modules are combined by Ray tasks (their terms travel with them).
    """
    started = time.perf_counter()
    spec = CombineSpec.parse(method, rank, density, majority_sign, seed)
    scale = ScaleOut.parse(ray, device, gpus_per_task)
    output = Path(output)
    out_dtype = parse_output_dtype(dtype)
    torch_device = resolve_device(device) if scale is None else None
    loaded = [a if isinstance(a, Adapter) else read_for_peft_output(a, adapter_format, alpha, base, allow_pickle)
              for a in adapters]
    if len(loaded) < 2:
        raise UsageError("give at least two adapters to combine")
    weights = parse_weights(list(weights) if weights is not None else None, len(loaded))
    base_paths = [Path(base)] if base is not None else []
    check_output_path(output, [*(p for g, a in zip(adapters, loaded) for p in read_paths(g, a.path)), *base_paths],
                      force)
    _check_inputs(loaded, spec)
    notes: list[str] = []
    full = _full_tensors(loaded, weights, notes)
    modules: dict[str, LoraModule] = {}
    reports = []
    items = [(name, [Term(w, a.modules[name]) for a, w in zip(loaded, weights) if name in a.modules])
             for name in sorted({n for a in loaded for n in a.modules})]
    cluster = None
    if scale is None:
        outcomes = combine_group(items, torch_device, spec, out_dtype)
    else:
        from ..distributed.runner import run_grouped

        costs = [sum(math.prod(logical_shape(t.module)) for t in terms) for _, terms in items]
        outcomes, cluster = run_grouped(scale, combine_group, items, costs, (spec, out_dtype), progress)
    for (name, _), (combined, error) in zip(items, outcomes):
        modules[name] = combined
        ranks_in = [a.modules[name].rank if name in a.modules else 0 for a in loaded]
        reports.append(CombinedModule(name, combined.kind.value, ranks_in, combined.rank, error))
    if any(m.bias is not None for m in modules.values()):
        _fill_missing_biases(modules, notes)
    config = _output_config(loaded, list(modules), notes)
    with atomic_output(output, is_folder=True) as temp:
        files = write_peft_adapter(temp, modules, full, config)
        adapter_bytes = sum(f.stat().st_size for f in files)
    return CombineResult(
        output=output,
        method=spec.method,
        adapters=[str(a.path) for a in loaded],
        weights=weights,
        modules=reports,
        parameters=sum(m.lora_A.numel() + m.lora_B.numel() for m in modules.values()),
        adapter_bytes=adapter_bytes,
        seconds=time.perf_counter() - started,
        notes=notes,
        cluster=cluster.to_json() if cluster else None,
    )


def combine_group(items: list[tuple[str, list[Term]]], device: torch.device | str, spec: CombineSpec,
                  dtype: torch.dtype | None) -> list[tuple[LoraModule, float | None]]:
    """Each module's combination and its compression error; one Ray task's share with `--ray`."""
    return [_combine_module(name, terms, spec, torch.device(device), dtype) for name, terms in items]


def _fill_missing_biases(modules: dict[str, LoraModule], notes: list[str]) -> None:
    filled = fill_missing_biases(modules)
    if filled:
        notes.append(f"lora_bias is all-or-nothing in PEFT, so these modules got a zero lora_B bias: {summarize(filled)}")
