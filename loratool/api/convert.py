"""`convert`: an adapter from any readable format to peft, kohya or diffusers, losslessly, or to
llama.cpp's GGUF (`convert_gguf.py`); or, with `--rank`/`--energy`, every module approximated as a plain
LoRA (the best rank-R one, `lora/to_lora.py`), for targets that hold LoRA only (LoHa, LoKr, Tucker
LoCon and full diffs -> PEFT LoRA or diffusers)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..checkpoint.output import atomic_output, check_output_path, read_paths
from ..dtypes import OUTPUT_DTYPE_CHOICES, parse_output_dtype
from ..errors import AdapterError, UsageError, summarize
from ..formats import CONVERT_TARGETS
from ..formats.adapters import (base_layout, candidate_modules, load_adapter, peft_config_for, resolve_names,
                                select_component, write_adapter)
from ..formats.names import components_of
from ..formats.peft import fill_missing_biases
from ..lora.kinds import LayerKind
from ..lora.module import Adapter
from ..lora.conversion import lora_problems
from ..lora.svd import RankRule
from ..options import check_finite
from ..lora.to_lora import module_as_lora
from .report import ConvertResult



def convert(
    adapter: str | os.PathLike,
    output: str | os.PathLike,
    to: str,
    base: str | os.PathLike | None = None,
    format: str | None = None,
    alpha: float | None = None,
    component: str | None = None,
    dtype: str = "auto",
    force: bool = False,
    allow_pickle: bool = False,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
) -> ConvertResult:
    """Read `adapter` (auto-detected or `format`) and write it as `to`; `base` resolves kohya names and
    gives LyCORIS modules their layer shapes (and, for gguf, is the HF model folder whose architecture
    and head counts llama.cpp needs). With `rank` or `energy` (optionally capped by `max_rank`) every
    module becomes a plain LoRA by truncated SVD of its ΔW, and the result reports each module's
    relative error."""
    rule = _rank_rule(rank, energy, max_rank)
    if to not in CONVERT_TARGETS:
        raise UsageError(f"--to must be one of {', '.join(CONVERT_TARGETS)}, got {to!r}")
    if to == "gguf":
        if component is not None:
            raise UsageError("--component does not apply to --to gguf (a GGUF adapter holds one model)")
        if rule is not None:
            raise UsageError("--rank/--energy do not apply to --to gguf; convert --to peft --rank R first, then "
                             "that adapter to gguf")
        from .convert_gguf import convert_to_gguf

        return convert_to_gguf(adapter, output, base, format=format, alpha=alpha, dtype=dtype, force=force,
                               allow_pickle=allow_pickle)
    if dtype not in OUTPUT_DTYPE_CHOICES:
        raise UsageError(f"--dtype {dtype} is for --to gguf only; {to} takes {', '.join(OUTPUT_DTYPE_CHOICES)}")
    output = Path(output)
    if to != "peft" and output.suffix != ".safetensors":
        raise UsageError(f"{to} adapters are single files: OUT must end in .safetensors, got {output}")
    if to == "peft" and output.suffix == ".safetensors":
        raise UsageError(f"PEFT adapters are folders (adapter_config.json + adapter_model.safetensors), got {output}")
    out_dtype = parse_output_dtype(dtype)
    layout = base_layout(base, allow_pickle)
    loaded = load_adapter(adapter, format=format, allow_pickle=allow_pickle, alpha=alpha)
    check_finite([loaded], remedy=None)
    check_output_path(output, [*read_paths(adapter, loaded.path), *([Path(base)] if base is not None else [])], force)
    notes = []
    if to != "kohya" or layout is not None:
        loaded = resolve_names(loaded, layout)
    errors = None
    if rule is not None:
        errors = as_lora(loaded, rule, keep_norms=to == "kohya", dtype=out_dtype, notes=notes)
        if to != "kohya":
            fill_missing_biases(loaded.modules)
    chosen = component
    if to == "peft":
        chosen = component or next(iter(components_of(loaded.modules)), None)
        loaded = select_component(loaded, component)
    if to == "kohya" and layout is not None and layout.native_dit:
        loaded.modules = _native_names(loaded.modules, layout)
    if any(m.use_rslora for m in loaded.modules.values()) and to == "kohya":
        notes.append("kohya has no rsLoRA flag: alpha was rewritten as s·r, so every scale is unchanged")
    config = None
    if to == "peft":
        model_config = layout.config if layout is not None else None
        config = peft_config_for(loaded, candidate_modules(layout, chosen), model_config)
    with atomic_output(output, is_folder=to == "peft") as temp:
        files = write_adapter(loaded, temp, to, config=config, dtype=out_dtype, component=component or "unet")
        names = [f.name for f in files] if to == "peft" else [output.name]
    return ConvertResult(output, loaded.source_format, to, len(loaded.modules), names, notes, errors)


def _native_names(modules: dict, layout) -> dict:
    """Modules renamed to the base's own names where one native module holds each (musubi-tuner's and
    ComfyUI's names for a DiT); parts of a fused native tensor keep their canonical names."""
    renamed = {}
    for name, module in modules.items():
        native = layout.native_name(name)
        if native is not None:
            module = module.restricted(native[0], None, True) if native[1] else module.renamed(native[0])
        renamed[module.name] = module
    return renamed


def _rank_rule(rank: int | None, energy: float | None, max_rank: int | None) -> RankRule | None:
    if rank is None and energy is None:
        if max_rank is not None:
            raise UsageError("--max-rank caps --rank or --energy; give one of them")
        return None
    return RankRule(rank, energy, max_rank)


def as_lora(adapter: Adapter, rule: RankRule, keep_norms: bool = False, dtype: torch.dtype | None = None,
            notes: list[str] | None = None) -> dict[str, float]:
    """Replace every module of `adapter` by its plain-LoRA approximation under `rule`, in place, and
    return module -> relative Frobenius error. Every problem is collected and raised as one error before
    anything changes: `lora_problems`, and DoRA (its magnitude rescales W + ΔW, so no fixed LoRA
    follows it)."""
    problems = lora_problems(adapter.modules, keep_norms)
    problems += [f"{name}: a DoRA {m.algorithm} module's magnitude rescales W + ΔW, which no plain LoRA reproduces "
                 "(merge it, then svd-extract the merged model)" for name, m in sorted(adapter.modules.items())
                 if m.is_dora]
    if problems:
        raise AdapterError(f"{adapter.path}: cannot convert to LoRA: {summarize(problems)}")
    errors, kept = {}, []
    for name, module in sorted(adapter.modules.items()):
        if module.kind is LayerKind.NORM:
            kept.append(name)
            continue
        adapter.modules[name], errors[name] = module_as_lora(module, rule, dtype)
    if kept and notes is not None:
        notes.append(f"norm-layer diffs have no LoRA form and were kept as they are: {summarize(kept)}")
    return errors
