"""`convert --to gguf`: any readable adapter as the one GGUF file llama.cpp's `--lora` loads, applying
exactly PEFT's delta (per-module scales folded into lora_b, llama-arch q/k rows reordered)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint.output import atomic_output, check_output_path
from ..errors import MismatchError, UsageError, summarize
from ..formats.adapters import base_layout, load_adapter, resolve_names, select_component
from ..formats.gguf import GGUF_DTYPES, GGUF_SUFFIX, plan_gguf, read_gguf_base, write_gguf_adapter
from ..lora.llamacpp import scale_ratio, shared_alpha
from ..options import check_finite
from ..resolve import resolve
from .report import ConvertResult


@dataclass
class GgufConvertResult(ConvertResult):
    architecture: str = ""
    alpha: float = 0.0
    tensor_types: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {**super().to_json(), "architecture": self.architecture, "alpha": self.alpha,
                "tensor_types": self.tensor_types}


def convert_to_gguf(
    adapter: str | os.PathLike,
    output: str | os.PathLike,
    base: str | os.PathLike | None,
    format: str | None = None,
    alpha: float | None = None,
    dtype: str = "auto",
    force: bool = False,
    allow_pickle: bool = False,
) -> GgufConvertResult:
    """Write `adapter` as a llama.cpp GGUF LoRA for the HF model folder `base`."""
    output = Path(output)
    if base is None:
        raise UsageError("--to gguf needs --base, the base's HF model folder: its config.json gives the llama.cpp "
                         "architecture and head counts")
    if output.suffix != GGUF_SUFFIX:
        raise UsageError(f"GGUF adapters are single files: OUT must end in {GGUF_SUFFIX}, got {output}")
    if dtype != "auto" and dtype not in GGUF_DTYPES:
        raise UsageError(f"--dtype for gguf must be auto or one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    gguf_base = read_gguf_base(base)
    loaded = load_adapter(adapter, format=format, allow_pickle=allow_pickle, alpha=alpha)
    check_finite([loaded], remedy=None)
    layout = base_layout(base, allow_pickle) if gguf_base.shapes is not None else None  # a config-only folder has none
    if loaded.unresolved_names:  # kohya names map back only through the base's weights
        loaded = _against_base(loaded, layout, resolve_names)
    loaded = select_component(loaded, None)
    pairs, notes = plan_gguf(loaded, gguf_base)
    if layout is not None:  # every pair's shape and orientation, from the one resolver
        _against_base(loaded, layout, resolve)
    check_output_path(output, [Path(adapter), Path(base)], force)
    file_alpha = shared_alpha(p.module for p in pairs)
    folded = [p.module.name for p in pairs if scale_ratio(p.module, file_alpha) != 1.0]
    if folded:
        notes.append(f"adapter.lora.alpha = {file_alpha:g}; llama.cpp scales every tensor by alpha/rank, so PEFT's own "
                     f"scale for {len(folded)} module(s) ({summarize(folded, 2)}) is folded into lora_b")
    permuted = sum(1 for p in pairs if p.permute_heads)
    if permuted:
        notes.append(f"{gguf_base.arch_name} arch: lora_b rows of {permuted} q/k projection(s) reordered per head, "
                     "as llama.cpp's converter reorders the base's q/k weights")
    with atomic_output(output, is_folder=False) as temp:
        report = write_gguf_adapter(temp, pairs, file_alpha, gguf_base, None if dtype == "auto" else dtype,
                                    name=_adapter_name(loaded.path), base_model=loaded.base_model)
    if report.fallbacks:
        notes.append(f"q8_0 needs rows of a multiple of 32 values; {len(report.fallbacks)} tensor(s) written as f16 "
                     f"instead: {summarize(sorted(report.fallbacks), 3)}")
    types = dict(sorted(Counter(report.types.values()).items()))
    return GgufConvertResult(output, loaded.source_format, "gguf", len(pairs), [output.name], notes,
                             architecture=gguf_base.arch_name, alpha=file_alpha, tensor_types=types)


def _against_base(adapter, layout, resolver):
    try:
        return resolver(adapter, layout)
    except MismatchError as e:
        raise MismatchError(f"{e} (wrong --base?)") from None


def _adapter_name(path: Path) -> str:
    return path.stem if path.is_file() else path.name
