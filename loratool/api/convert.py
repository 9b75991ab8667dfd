"""`convert`: an adapter from any readable format to peft, kohya or diffusers, losslessly, or to
llama.cpp's GGUF (`convert_gguf.py`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint.output import atomic_output, check_output_path
from ..dtypes import OUTPUT_DTYPE_CHOICES, parse_output_dtype
from ..errors import UsageError
from ..formats import WRITABLE, base_layout, load_adapter, require_resolved, select_component, write_adapter
from ..formats.names import components_of
from ..layouts import BaseLayout
from ..lora.module import Adapter
from ..lora.targeting import CONV1D_MODEL_TYPES, compact_target_modules

#: Every `--to`: the adapter formats, and llama.cpp's GGUF, which needs the base to write.
CONVERT_TARGETS = (*WRITABLE, "gguf")


@dataclass
class ConvertResult:
    output: Path
    source_format: str
    target_format: str
    modules: int
    files: list[str]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"output": str(self.output), "from": self.source_format, "to": self.target_format,
                "modules": self.modules, "files": self.files, "notes": self.notes}


def candidate_modules(layout: BaseLayout | None, component: str | None) -> set[str] | None:
    """Every module of the base component a PEFT adapter will be loaded into (for short target_modules)."""
    if layout is None:
        return None
    found = layout.components.get(component)
    if found is None and len(layout.components) == 1:
        found = next(iter(layout.components.values()))
    return set(found.targets) if found is not None else None


def peft_config_for(adapter: Adapter, candidates: set[str] | None = None, model_config: dict | None = None) -> dict:
    """The non-scaling fields of adapter_config.json for an adapter that did not come from PEFT."""
    if adapter.source_format in ("peft", "peft-state") and adapter.config.get("target_modules") is not None:
        kept = {k: v for k, v in adapter.config.items() if k not in ("rank_pattern", "alpha_pattern")}
        return kept
    targets = compact_target_modules(adapter.modules, candidates)
    model_type = (model_config or {}).get("model_type")
    return {"target_modules": targets, "fan_in_fan_out": model_type in CONV1D_MODEL_TYPES}


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
) -> ConvertResult:
    """Read `adapter` (auto-detected or `format`) and write it as `to`; `base` resolves kohya names
    (and, for gguf, is the HF model folder whose architecture and head counts llama.cpp needs)."""
    if to not in CONVERT_TARGETS:
        raise UsageError(f"--to must be one of {', '.join(CONVERT_TARGETS)}, got {to!r}")
    if to == "gguf":
        if component is not None:
            raise UsageError("--component does not apply to --to gguf (a GGUF adapter holds one model)")
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
    check_output_path(output, [Path(adapter)] + ([Path(base)] if base is not None else []), force)
    notes = []
    if to != "kohya" or layout is not None:
        loaded = require_resolved(loaded, layout)
    chosen = component
    if to == "peft":
        chosen = component or next(iter(components_of(loaded.modules)), None)
        loaded = select_component(loaded, component)
    if any(m.use_rslora for m in loaded.modules.values()) and to == "kohya":
        notes.append("kohya has no rsLoRA flag: alpha was rewritten as s·r, so every scale is unchanged")
    config = None
    if to == "peft":
        model_config = _model_config(base)
        config = peft_config_for(loaded, candidate_modules(layout, chosen), model_config)
    with atomic_output(output, is_folder=to == "peft") as temp:
        files = write_adapter(loaded, temp, to, config=config, dtype=out_dtype, component=component or "unet")
        names = [f.name for f in files] if to == "peft" else [output.name]
    return ConvertResult(output, loaded.source_format, to, len(loaded.modules), names, notes)


def _model_config(base: str | os.PathLike | None) -> dict | None:
    if base is None:
        return None
    from ..checkpoint import open_checkpoint

    base = Path(base)
    if (base / "model_index.json").is_file():
        return None
    with open_checkpoint(base) as checkpoint:
        return checkpoint.config()
