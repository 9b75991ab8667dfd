"""Detecting, loading and writing adapters through the format registry (`formats/__init__.py`), and
mapping their names onto a base (through the one resolver, `resolve.py`) for commands that write them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoint import open_checkpoint
from ..errors import AdapterError, LoratoolError
from ..layouts import BaseLayout, open_base
from ..lora.module import Adapter
from ..lora.targeting import CONV1D_MODEL_TYPES, compact_target_modules
from ..options import check_finite
from ..resolve import resolved_modules
from . import FORMATS, REGISTRY, WRITABLE, ReadOptions, WriteOptions
from .names import components_of, split_component
from .peft import WEIGHT_NAMES, find_peft_folder

if TYPE_CHECKING:
    import torch


def detect_format(path: str | os.PathLike, allow_pickle: bool = False) -> str | None:
    """The adapter format at `path`, or None when it is not an adapter loratool recognises."""
    path = Path(path)
    if not path.exists():
        return None
    if (path.is_dir() or path.name in WEIGHT_NAMES) and find_peft_folder(path) is not None:
        return "peft"
    try:
        with open_checkpoint(path, allow_pickle=allow_pickle, quantized=False) as checkpoint:
            keys = list(checkpoint)
    except LoratoolError:
        return None
    return next((name for name, f in REGISTRY.items() if f.implementation().looks_like(keys)), None)


def load_adapter(path: str | os.PathLike, format: str | None = None, allow_pickle: bool = False,
                 alpha: float | None = None, need_alpha: bool = True, header_only: bool = False) -> Adapter:
    """Read an adapter in any known format, with the module names it stores (kohya's stay flattened
    until `resolve_names` maps them through a base). `alpha` supplies the lora_alpha that loralib,
    bare PEFT state dicts and PEFT weights without their config lack; `need_alpha=False` reads those
    with alpha unknown, and `header_only=True` describes PEFT, kohya LoRA and diffusers files from their
    headers, without reading data or importing torch (both for inspect)."""
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"{path}: no such file or folder")
    if format is not None and format not in FORMATS:
        raise AdapterError(f"unknown adapter format {format!r}; known: {', '.join(FORMATS)}")
    format = format or detect_format(path, allow_pickle)
    if format is None:
        raise AdapterError(f"{path}: not a recognised adapter (known formats: {', '.join(FORMATS)})")
    options = ReadOptions(allow_pickle=allow_pickle, alpha=alpha, need_alpha=need_alpha, header_only=header_only)
    return REGISTRY[format].implementation().read(path, options)


def resolve_names(adapter: Adapter, layout: BaseLayout | None) -> Adapter:
    """The adapter's modules as they land on the base (`resolve.py`), for commands that write adapters:
    kohya's flattened names are always mapped (they need a base), and any dialect against a diffusion
    base becomes the base's canonical names (diffusers'); plain-model adapters keep the names PEFT loads
    them by. Every module gets its base weight's shape (a LoHa/LoKr file stores conv kernels flattened),
    and a LoRA on a fused module (Flux `qkv`) becomes one module per part, nothing approximated."""
    if layout is None:
        if adapter.unresolved_names:
            raise AdapterError(
                f"{adapter.path}: kohya names flatten module paths ('.' -> '_'), so they can only be mapped back "
                "with the base model: pass --base"
            )
        return adapter
    canonical = adapter.unresolved_names or layout.kind != "transformers"
    adapter.modules = resolved_modules(adapter, layout, canonical_names=canonical)
    adapter.unresolved_names = False
    return adapter


def base_layout(base: str | os.PathLike | None, allow_pickle: bool = False) -> BaseLayout | None:
    """The layout of a base given as --base (headers only), or None."""
    if base is None:
        return None
    layout, checkpoints = open_base(base, allow_pickle=allow_pickle)
    for checkpoint in checkpoints.values():
        checkpoint.close()
    return layout


def select_component(adapter: Adapter, component: str | None) -> Adapter:
    """Keep one pipeline component's modules (without the prefix), for formats that hold one model."""
    present = components_of(adapter.modules)
    if component is None:
        if len(present) > 1:
            named = ", ".join(c or "(none)" for c in present)
            raise AdapterError(f"{adapter.path} spans pipeline components {named}; a PEFT adapter holds one model, "
                               "so pick one with --component")
        component = present[0] if present else None
    if component is None:
        return adapter
    modules = {}
    for name, module in adapter.modules.items():
        owner, inner = split_component(name)
        if owner == component:
            module.name = inner
            modules[inner] = module
    if not modules:
        raise AdapterError(f"{adapter.path} has no modules in component {component!r}")
    adapter.modules = modules
    return adapter


def read_for_peft_output(path: str | os.PathLike, format: str | None, alpha: float | None,
                         base: str | os.PathLike | None, allow_pickle: bool = False) -> Adapter:
    """Load an adapter whose result will be written as PEFT: real module names, one model."""
    adapter = load_adapter(path, format=format, allow_pickle=allow_pickle, alpha=alpha)
    check_finite([adapter], remedy=None)
    layout = base_layout(base, allow_pickle)
    return select_component(resolve_names(adapter, layout), None)


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
        return {k: v for k, v in adapter.config.items() if k not in ("rank_pattern", "alpha_pattern")}
    targets = compact_target_modules(adapter.modules, candidates)
    model_type = (model_config or {}).get("model_type")
    return {"target_modules": targets, "fan_in_fan_out": model_type in CONV1D_MODEL_TYPES}


def write_adapter(adapter: Adapter, output: Path, format: str, config: dict | None = None,
                  dtype: torch.dtype | None = None, component: str = "unet") -> list[Path]:
    """Write `adapter` as `format` into `output` (a folder for peft, a .safetensors file otherwise)."""
    if format not in WRITABLE:
        raise AdapterError(f"cannot write {format!r}; writable formats: {', '.join(WRITABLE)}")
    options = WriteOptions(config=config, dtype=dtype, component=component)
    return REGISTRY[format].implementation().write(output, adapter, options)
