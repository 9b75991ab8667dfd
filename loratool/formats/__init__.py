"""Adapter formats: the registry, name -> the module that reads (and writes) it.

This package's `__init__` holds only the table, so the CLI builds its choices and help from it without
importing a reader. Each format module offers `looks_like(keys)`, `read(path, options)` and, when the
format is writable, `write(path, adapter, options)`; `formats/adapters.py` detects, loads and writes
through the table. A new format is one module and one line here.

| format       | reads | writes | what it is                                                        |
|--------------|-------|--------|-------------------------------------------------------------------|
| `kohya`      | yes   | yes    | sd-scripts / LyCORIS `lora_unet_…` names (they need a base)        |
| `peft`       | yes   | yes    | adapter_config.json + adapter_model.safetensors (LoRA, LoHa, LoKr) |
| `peft-state` | yes   | no     | a PEFT-wrapped model's whole state dict (`base_layer`, `.default`) |
| `diffusers`  | yes   | yes    | `unet.`/`text_encoder.`-prefixed keys, config in the metadata      |
| `loralib`    | yes   | no     | microsoft/LoRA: a whole state dict with `<module>.lora_A/lora_B`   |

llama.cpp's GGUF adapters (`gguf.py`) are inspected and written by `convert --to gguf` against a base,
not through this table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class AdapterFormat:
    name: str
    #: The submodule of `loratool.formats` that implements it.
    module: str
    summary: str
    writes: bool = False
    #: A whole model checkpoint with LoRA tensors inside, rather than an adapter file.
    embedded: bool = False

    def implementation(self) -> ModuleType:
        return importlib.import_module(f"{__name__}.{self.module}")


@dataclass(frozen=True)
class ReadOptions:
    allow_pickle: bool = False
    #: The lora_alpha that loralib, bare PEFT state dicts and PEFT weights without their config lack.
    alpha: float | None = None
    #: False reads those with alpha unknown (inspect).
    need_alpha: bool = True
    #: Describe the file from its header, without reading data or importing torch (inspect).
    header_only: bool = False


@dataclass(frozen=True)
class WriteOptions:
    #: adapter_config.json fields (PEFT).
    config: dict | None = None
    dtype: torch.dtype | None = None
    #: The pipeline component a single-model diffusers file is for.
    component: str = "unet"


#: Every format, in the order detection tries them (the first whose `looks_like` accepts a file's keys).
REGISTRY: dict[str, AdapterFormat] = {f.name: f for f in (
    AdapterFormat("kohya", "kohya", "sd-scripts / LyCORIS lora_unet_… names (need a base to map back)", writes=True),
    AdapterFormat("peft", "peft_folder", "adapter_config.json + adapter_model.safetensors (LoRA, LoHa, LoKr)",
                  writes=True),
    AdapterFormat("peft-state", "peft_state", "a PEFT-wrapped model's whole state dict", embedded=True),
    AdapterFormat("diffusers", "diffusers", "unet./transformer./text_encoder.-prefixed LoRA keys", writes=True),
    AdapterFormat("loralib", "loralib", "microsoft/LoRA: a whole state dict with <module>.lora_A/lora_B",
                  embedded=True),
)}

FORMATS = tuple(REGISTRY)
WRITABLE = tuple(name for name, f in REGISTRY.items() if f.writes)
EMBEDDED = tuple(name for name, f in REGISTRY.items() if f.embedded)
#: Every `convert --to`: the writable formats, and llama.cpp's GGUF, which is written against a base.
CONVERT_TARGETS = (*WRITABLE, "gguf")
