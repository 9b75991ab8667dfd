"""Adapter formats. Detection lives here, once; each reader returns the canonical `Adapter` and each
writer takes one.

| format       | reads | writes | what it is                                                        |
|--------------|-------|--------|-------------------------------------------------------------------|
| `peft`       | yes   | yes    | adapter_config.json + adapter_model.safetensors                    |
| `kohya`      | yes   | yes    | sd-scripts `lora_unet_…lora_down/up/alpha` (names need a base)     |
| `diffusers`  | yes   | yes    | `unet.`/`text_encoder.`-prefixed keys, config in the metadata      |
| `loralib`    | yes   | no     | microsoft/LoRA: a whole state dict with `<module>.lora_A/lora_B`   |
| `peft-state` | yes   | no     | a PEFT-wrapped model's whole state dict (`base_layer`, `.default`) |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoint import open_checkpoint
from ..errors import AdapterError, LoratoolError
from ..lora.module import Adapter
from .diffusers import looks_like_diffusers, read_diffusers_adapter, write_diffusers_adapter
from .kohya import looks_like_kohya, read_kohya_adapter, resolve_kohya_names, write_kohya_adapter
from .loralib import looks_like_loralib, read_loralib_adapter
from .names import components_of, split_component
from .peft import WEIGHT_NAMES, find_peft_folder, read_peft_adapter, write_peft_adapter
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
    for name, looks in (("kohya", looks_like_kohya), ("peft-state", looks_like_peft_state),
                        ("diffusers", looks_like_diffusers), ("loralib", looks_like_loralib)):
        if looks(keys):
            return name
    return None


def load_adapter(path: str | os.PathLike, format: str | None = None, allow_pickle: bool = False,
                 base: str | os.PathLike | Mapping | None = None, alpha: float | None = None) -> Adapter:
    """Read an adapter in any known format. `base` (a path, or component -> module names) resolves
    kohya's flattened names; `alpha` supplies the lora_alpha loralib and bare PEFT state dicts lack."""
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"{path}: no such file or folder")
    if format is not None and format not in FORMATS:
        raise AdapterError(f"unknown adapter format {format!r}; known: {', '.join(FORMATS)}")
    format = format or detect_format(path, allow_pickle)
    if format is None:
        raise AdapterError(f"{path}: not a recognised adapter (known formats: {', '.join(FORMATS)})")
    if format == "peft":
        return read_peft_adapter(path, allow_pickle=allow_pickle)
    if format == "kohya":
        return read_kohya_adapter(path, base=base, allow_pickle=allow_pickle)
    if format == "diffusers":
        return read_diffusers_adapter(path, allow_pickle=allow_pickle)
    if format == "loralib":
        return read_loralib_adapter(path, alpha=alpha, allow_pickle=allow_pickle)
    return read_peft_state_adapter(path, alpha=alpha, allow_pickle=allow_pickle)


def require_resolved(adapter: Adapter, base: str | os.PathLike | Mapping | None) -> Adapter:
    """Resolve kohya names against `base`, or explain why a base is needed."""
    if not adapter.unresolved_names:
        return adapter
    if base is None:
        raise AdapterError(
            f"{adapter.path}: kohya names flatten module paths ('.' -> '_'), so they can only be mapped back with "
            "the base model: pass --base"
        )
    return resolve_kohya_names(adapter, base)


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
    from .names import base_modules

    index = base_modules(base, allow_pickle) if base is not None else None
    adapter = load_adapter(path, format=format, allow_pickle=allow_pickle, base=index, alpha=alpha)
    return select_component(require_resolved(adapter, index), None)


def write_adapter(adapter: Adapter, output: Path, format: str, config: dict | None = None,
                  dtype: torch.dtype | None = None, component: str = "unet") -> list[Path]:
    """Write `adapter` as `format` into `output` (a folder for peft, a .safetensors file otherwise)."""
    if format == "peft":
        return write_peft_adapter(output, adapter.modules, adapter.full_tensors, config or {}, dtype)
    if format == "kohya":
        return write_kohya_adapter(output, adapter, dtype)
    if format == "diffusers":
        return write_diffusers_adapter(output, adapter, component, dtype)
    raise AdapterError(f"cannot write {format!r}; writable formats: {', '.join(WRITABLE)}")
