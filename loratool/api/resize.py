"""`resize`: re-rank an adapter through QR of its factors, never forming ΔW.

LyCORIS modules without factors (LoHa, LoKr, full diffs) become plain rank-R LoRAs by a truncated SVD
of their ΔW, and LoCon (a Tucker mid flattens into a factor pair) is re-ranked like a LoRA
(`lora/to_lora.py`), so resize always writes plain LoRA, whatever algorithm it read.

For ΔW = s·B@A (out×in, rank r): B = Q_b R_b and Aᵀ = Q_a R_a, so ΔW = Q_b (s·R_b R_aᵀ) Q_aᵀ and the
SVD of the r×r core gives ΔW's exact singular triplets in O((out + in)·r²). Truncating them is the best
rank-R approximation (Eckart–Young), and R ≥ r reproduces ΔW exactly.
"""

from __future__ import annotations

import math
import os
import time
from functools import partial
from pathlib import Path

import torch

from ..checkpoint.output import atomic_output, check_output_path, read_paths
from ..distributed.options import ScaleOut
from ..distributed.runner import ProgressCallback
from ..dtypes import parse_output_dtype
from ..errors import AdapterError, summarize
from ..formats.adapters import read_for_peft_output
from ..formats.peft import fill_missing_biases, write_peft_adapter
from ..formats.peft_lycoris import as_lora_config
from ..lora.algorithms import AdapterModule, LoraModule
from ..lora.module import Adapter
from ..lora.svd import RankRule, energy_of, factored_norm
from ..lora.conversion import lora_problems
from ..lora.to_lora import logical_factors, logical_shape, module_as_lora
from ..lora.targeting import compact_target_modules
from .report import LowRankResult, ModuleReport
from .svd_extract import LowRankOnCluster


def _report(name: str, module: AdapterModule, resized: LoraModule, error: float) -> ModuleReport:
    shape = logical_shape(module)
    pair = logical_factors(module)
    if pair is not None:
        norm = factored_norm(pair[0].double() * module.scale, pair[1].double())
    else:
        norm = float(torch.linalg.vector_norm(module.delta(torch.float64)))
    return ModuleReport(name=name, kind=resized.kind.value, shape=[shape[0], math.prod(shape[1:])], rank=resized.rank,
                        energy=energy_of(error), relative_error=error, delta_norm=norm)


def resize(
    adapter: str | os.PathLike | Adapter,
    output: str | os.PathLike,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
    dtype: str = "auto",
    force: bool = False,
    allow_pickle: bool = False,
    adapter_format: str | None = None,
    alpha: float | None = None,
    base: str | os.PathLike | None = None,
    seed: int = 0,
    ray: str | None = None,
    gpus_per_task: float | None = None,
    progress: ProgressCallback | None = None,
) -> LowRankResult:
    """Write `adapter` re-ranked to `rank` (or the smallest rank keeping `energy` per module) as PEFT.

    With `ray`, balanced groups of modules are re-ranked by Ray tasks (the modules travel with them);
    the modules without factors take their randomized SVD's seed from `seed` and the module's name.
    """
    started = time.perf_counter()
    scale = ScaleOut.parse(ray, "cuda" if gpus_per_task else "cpu", gpus_per_task)
    rule = RankRule(rank, energy, max_rank, seed)
    output = Path(output)
    out_dtype = parse_output_dtype(dtype)
    loaded = adapter if isinstance(adapter, Adapter) else \
        read_for_peft_output(adapter, adapter_format, alpha, base, allow_pickle)
    base_paths = [Path(base)] if base is not None else []
    check_output_path(output, [*read_paths(adapter, loaded.path), *base_paths], force)
    if loaded.use_dora:
        raise AdapterError(
            f"{loaded.path} is a DoRA adapter: its magnitude vector rescales W + ΔW row by row, so a re-ranked ΔW "
            "would no longer match it. Merge it (loratool merge) and svd-extract the merged model instead"
        )
    problems = lora_problems(loaded.modules)
    if problems:
        raise AdapterError(f"{loaded.path}: cannot resize to LoRA: {summarize(problems)}")
    modules, reports, notes = {}, [], []
    kept_exact = []
    items = sorted(loaded.modules.items())
    cluster = None
    if scale is None:
        resized = resize_group(items, "cpu", rule, out_dtype)
    else:
        from ..distributed.runner import run_grouped

        costs = [math.prod(logical_shape(module)) for _, module in items]
        resized, cluster = run_grouped(scale, resize_group, items, costs, (rule, out_dtype), progress)
    for (name, module), (modules[name], error) in zip(items, resized):
        reports.append(_report(name, module, modules[name], error))
        if rule.rank is not None and module.rank is not None and rule.rank >= module.rank and module.factored:
            kept_exact.append(name)
    converted = sorted({m.algorithm for m in loaded.modules.values() if not m.factored})
    if converted:
        notes.append(f"{', '.join(converted)} modules have no LoRA factors: each became a plain LoRA by truncated SVD "
                     "of its ΔW")
    fill_missing_biases(modules)
    if kept_exact:
        notes.append(f"--rank is at or above the current rank of {summarize(kept_exact)}; those are exact")
    config = {k: v for k, v in as_lora_config(loaded.config, loaded.source_format).items()
              if k not in ("rank_pattern", "alpha_pattern")}
    config.setdefault("target_modules", compact_target_modules(modules))
    with atomic_output(output, is_folder=True) as temp:
        files = write_peft_adapter(temp, modules, loaded.full_tensors, config)
        adapter_bytes = sum(f.stat().st_size for f in files)
    source_bytes = sum(t.numel() * t.element_size() for t in loaded.named_tensors().values())
    return (LowRankResult if cluster is None else partial(LowRankOnCluster, cluster=cluster))(
        output=output,
        method="factored",
        modules=reports,
        full_tensors=[],
        unchanged=0,
        parameters=sum(m.lora_A.numel() + m.lora_B.numel() for m in modules.values()),
        adapter_bytes=adapter_bytes,
        source_bytes=source_bytes,
        seconds=time.perf_counter() - started,
        notes=notes,
    )


def resize_group(items: list[tuple[str, AdapterModule]], device: str, rule: RankRule,
                 dtype: torch.dtype | None) -> list[tuple[LoraModule, float]]:
    """Each module as a plain LoRA under `rule` (seeded per module name) and its relative error; one Ray
    task's share with `--ray` (the factor math stays on the CPU: it is O((out + in)·r²))."""
    return [module_as_lora(module, rule.for_tensor(name), dtype) for name, module in items]
