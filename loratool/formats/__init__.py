"""Adapter formats. Detection lives here, once; each reader returns the canonical `Adapter` and each
writer takes one.

| format       | reads | writes | what it is                                                        |
|--------------|-------|--------|-------------------------------------------------------------------|
| `peft`       | yes   | yes    | adapter_config.json + adapter_model.safetensors                    |
| `kohya`      | yes   | yes    | sd-scripts `lora_unet_…lora_down/up/alpha` (names need a base)     |
| `diffusers`  | yes   | yes    | `unet.`/`text_encoder.`-prefixed keys, config in the metadata      |
| `loralib`    | yes   | no     | microsoft/LoRA: a whole state dict with `<module>.lora_A/lora_B`   |
| `peft-state` | yes   | no     | a PEFT-wrapped model's whole state dict (`base_layer`, `.default`) |
| `gguf`       | inspect | convert | llama.cpp `--lora` file (`gguf.py`; written against a base, not via write_adapter) |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoint import open_checkpoint
from ..errors import AdapterError, LoratoolError, summarize
from ..layouts import BaseLayout, open_base
from ..lora.module import Adapter
from ..lora.targeting import CONV1D_MODEL_TYPES, compact_target_modules
from ..resolve import resolved_modules
from .diffusers import looks_like_diffusers, read_diffusers_adapter, write_diffusers_adapter
from .kohya import looks_like_kohya, read_kohya_adapter, write_kohya_adapter
from .loralib import looks_like_loralib, read_loralib_adapter
from .names import components_of, split_component
from .peft import (WEIGHT_NAMES, find_peft_folder, looks_like_bare_peft, read_bare_peft_adapter, read_peft_adapter,
                   write_peft_adapter)
from .peft_lycoris import peft_type_of, read_peft_lycoris_adapter, write_peft_lycoris_adapter
from .peft_state import looks_like_peft_state, read_peft_state_adapter

if TYPE_CHECKING:
    import torch

FORMATS = ("peft", "kohya", "diffusers", "loralib", "peft-state")
WRITABLE = ("peft", "kohya", "diffusers")
#: Formats that are whole model checkpoints with LoRA tensors inside, rather than adapter files.
EMBEDDED = ("loralib", "peft-state")


def detect_format(path: str | os.PathLike, allow_pickle: bool = False) -> str | None:
    """The adapter format at `path`, or None when it is not an adapter loratool recognises."""
    path = Path(path)
    if not path.exists():
        return None
    if (path.is_dir() or path.name in WEIGHT_NAMES) and find_peft_folder(path) is not None:
        return "peft"
    try:
        with open_checkpoint(path, allow_pickle=allow_pickle) as checkpoint:
            keys = list(checkpoint)
    except LoratoolError:
        return None
    for name, looks in (("kohya", looks_like_kohya), ("peft", looks_like_bare_peft), ("peft-state", looks_like_peft_state),
                        ("diffusers", looks_like_diffusers), ("loralib", looks_like_loralib)):
        if looks(keys):
            return name
    return None


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
    if format == "peft":
        folder = find_peft_folder(path)
        if folder is None:
            return read_bare_peft_adapter(path, alpha=alpha, allow_pickle=allow_pickle, need_alpha=need_alpha,
                                          header_only=header_only)
        if peft_type_of(folder) is not None:
            return read_peft_lycoris_adapter(path, allow_pickle=allow_pickle)
        return read_peft_adapter(path, allow_pickle=allow_pickle, header_only=header_only)
    if format == "kohya":
        return read_kohya_adapter(path, allow_pickle=allow_pickle, header_only=header_only)
    if format == "diffusers":
        return read_diffusers_adapter(path, allow_pickle=allow_pickle, header_only=header_only)
    if format == "loralib":
        return read_loralib_adapter(path, alpha=alpha, allow_pickle=allow_pickle)
    return read_peft_state_adapter(path, alpha=alpha, allow_pickle=allow_pickle)


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


def lora_only_refusal(modules: Mapping[str, object], why: str) -> AdapterError | None:
    """The one error for an adapter with LyCORIS modules (LoHa, LoKr, Tucker LoCon, full diffs) written
    where only plain LoRA fits (`why` says where), naming every algorithm it holds and the way out
    (`--rank`); None when every module is a plain LoRA."""
    if all(m.plain_lora for m in modules.values()):
        return None
    found: dict[str, list[str]] = {}
    for name, module in sorted(modules.items()):
        label = module.algorithm
        if not module.plain_lora and module.algorithm in ("lora", "locon"):
            label += " (Tucker)" if module.tucker else " (DoRA on the input axis)"
        found.setdefault(label, []).append(name)
    held = ", ".join(f"{label} on {summarize(names, 2)}" for label, names in sorted(found.items()))
    return AdapterError(f"{why}, and this adapter has {held}; convert with --rank R (or --energy E) to "
                        "approximate every module as a LoRA")


def write_adapter(adapter: Adapter, output: Path, format: str, config: dict | None = None,
                  dtype: torch.dtype | None = None, component: str = "unet") -> list[Path]:
    """Write `adapter` as `format` into `output` (a folder for peft, a .safetensors file otherwise).

    PEFT holds one `peft_type` per adapter: plain LoRA goes to a LoRA folder, all-LoHa or all-LoKr
    modules to a PEFT LoHa/LoKr folder; other mixes are refused (`--rank` makes them all LoRA)."""
    if format == "peft":
        algorithms = {m.algorithm for m in adapter.modules.values()}
        if algorithms in ({"loha"}, {"lokr"}):
            ambiguous = [n for n, m in adapter.modules.items() if m.shape_ambiguous]
            # PEFT's LoKr layout depends on the layer type, and so does LoHa's once any conv is Tucker
            if ambiguous and (algorithms == {"lokr"} or any(m.tucker for m in adapter.modules.values())):
                raise AdapterError(f"{summarize(sorted(ambiguous))}: PEFT's layout depends on whether the layer is a "
                                   "Linear or a Conv2d, and the file stores conv kernels flattened: pass --base")
            lycoris_config = {k: v for k, v in (config or {}).items() if k != "fan_in_fan_out"}
            return write_peft_lycoris_adapter(output, adapter.modules, adapter.full_tensors, lycoris_config, dtype)
        refusal = lora_only_refusal(adapter.modules, "a PEFT adapter has one peft_type: plain LoRA, or every module "
                                                     "LoHa, or every module LoKr")
        if refusal is not None:
            raise refusal
        return write_peft_adapter(output, adapter.modules, adapter.full_tensors, config or {}, dtype)
    if format == "kohya":
        return write_kohya_adapter(output, adapter, dtype)
    if format == "diffusers":
        refusal = lora_only_refusal(adapter.modules, "a diffusers LoRA file holds plain LoRA only")
        if refusal is not None:
            raise refusal
        return write_diffusers_adapter(output, adapter, component, dtype)
    raise AdapterError(f"cannot write {format!r}; writable formats: {', '.join(WRITABLE)}")
