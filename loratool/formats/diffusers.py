"""diffusers LoRA files: one `.safetensors` whose keys start with the pipeline component
(`unet.`, `text_encoder.`, `transformer.`, ...).

Read: PEFT-style `…lora_A.weight`/`lora_B.weight`, the older `…lora.down.weight`/`lora.up.weight` and
`lora_linear_layer.down/up`, the legacy attention-processor names (`attn1.processor.to_q_lora`), and
alphas from the `lora_adapter_metadata` JSON diffusers ≥ 0.34 writes (one PEFT LoraConfig per
component, keys `<component>.<field>`), from `<module>.alpha` network-alpha tensors, or alpha = r.
Write: PEFT-style keys plus that metadata, so rank/alpha patterns and rsLoRA survive exactly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoint import open_checkpoint
from ..checkpoint.writer import write_safetensors
from ..errors import AdapterError, summarize
from ..jsonio import LORA_CONFIG_RULES, check_fields, parse_json
from ..lora.module import Adapter
from ..lora.kinds import LayerKind
from ..lora.algorithms import LoraModule
from ..lora.scaling import pattern_value
from ..lora.conversion import lora_only_refusal
from . import ReadOptions, WriteOptions
from .names import COMPONENTS, split_component
from .peft import lora_config_fields, lora_tensors

if TYPE_CHECKING:
    import torch

METADATA_KEY = "lora_adapter_metadata"
#: Tensor suffix -> role, longest first.
SUFFIXES = {
    ".lora_embedding_A": "A", ".lora_embedding_B": "B", ".lora_magnitude_vector": "magnitude",
    ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "bias",
    ".lora_linear_layer.down.weight": "A", ".lora_linear_layer.up.weight": "B",
    ".lora.down.weight": "A", ".lora.up.weight": "B", ".alpha": "alpha",
}
#: Legacy attention-processor names -> the module they adapt.
LEGACY = [(re.compile(r"\.processor\.(to_[qkv])_lora$"), r".\1"), (re.compile(r"\.processor\.to_out_lora$"), ".to_out.0"),
          (re.compile(r"\.self_attn\.to_([qkv])_lora$"), r".self_attn.\1_proj"),
          (re.compile(r"\.self_attn\.to_out_lora$"), ".self_attn.out_proj")]


def looks_like(keys: list[str]) -> bool:
    return bool(keys) and all(split_component(k)[0] is not None for k in keys) and any(
        k.endswith(tuple(s for s, r in SUFFIXES.items() if r == "A")) for k in keys)


def _module_of(key: str) -> tuple[str, str] | None:
    for suffix, role in SUFFIXES.items():
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            for pattern, replacement in LEGACY:
                module = pattern.sub(replacement, module)
            return module, role
    return None


def _component_configs(metadata: dict[str, str], source: Path) -> dict[str, dict]:
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    where = f"{source}: metadata {METADATA_KEY!r}"
    flat = parse_json(raw, where, AdapterError)  # an object, bounded, no NaN or duplicated keys
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    for component, config in configs.items():
        check_fields(config, where, LORA_CONFIG_RULES, AdapterError, prefix=f"{component}.")
    return configs


def read(path: Path, options: ReadOptions) -> Adapter:
    with open_checkpoint(path, allow_pickle=options.allow_pickle, quantized=False) as checkpoint:
        state = checkpoint.load_all(options.header_only)
        metadata = next(iter(checkpoint.metadata.values()), None) or {}
    configs = _component_configs(metadata, path)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, LayerKind] = {}
    unknown = []
    for key, tensor in state.items():
        parsed = _module_of(key)
        if parsed is None or split_component(parsed[0])[0] is None:
            unknown.append(key)
            continue
        module, role = parsed
        groups.setdefault(module, {})[role] = tensor
        if "embedding" in key:
            kinds[module] = LayerKind.EMBEDDING
    if unknown:
        raise AdapterError(f"{path}: keys that are not diffusers LoRA tensors: {summarize(unknown)}")
    problems, modules = [], {}
    for name, parts in sorted(groups.items()):
        A, B = parts.get("A"), parts.get("B")
        if A is None or B is None:
            problems.append(f"{name} has only {'lora_B' if A is None else 'lora_A'}")
            continue
        rank = A.shape[0]
        if B.dim() < 2 or B.shape[1] != rank:
            problems.append(f"{name}: A {list(A.shape)} and B {list(B.shape)} do not pair")
            continue
        component, inner = split_component(name)
        config = configs.get(component, {})
        if "alpha" in parts:
            alpha, rslora = float(parts["alpha"].item()), False
        elif config:
            alpha = float(pattern_value(config.get("alpha_pattern") or {}, inner, config.get("lora_alpha", rank)))
            rslora = bool(config.get("use_rslora", False))
        else:
            alpha, rslora = float(rank), False
        magnitude = parts.get("magnitude")
        modules[name] = LoraModule(name=name, kind=kinds.get(name, LayerKind.CONV if A.dim() == 4 else LayerKind.LINEAR),
                                   lora_A=A, lora_B=B, alpha=alpha, use_rslora=rslora,
                                   magnitude=magnitude.reshape(-1) if magnitude is not None else None,
                                   bias=parts.get("bias"))
    if problems:
        raise AdapterError(f"{path}: {summarize(problems)}")
    if not modules:
        raise AdapterError(f"{path}: holds no LoRA tensors")
    return Adapter(path=path, source_format="diffusers", modules=modules,
                   config={"components": configs, "metadata": dict(metadata)})


def write(path: Path, adapter: Adapter, options: WriteOptions) -> list[Path]:
    """One `.safetensors` with PEFT-style keys under component prefixes and per-component configs in
    the metadata (plain LoRA only). Modules without a component prefix get `options.component`."""
    refusal = lora_only_refusal(adapter.modules, "a diffusers LoRA file holds plain LoRA only")
    if refusal is not None:
        raise refusal
    component, dtype = options.component, options.dtype
    if adapter.full_tensors:
        raise AdapterError(f"diffusers LoRA files cannot hold whole tensors (modules_to_save): "
                           f"{summarize(sorted(adapter.full_tensors))}; convert to peft instead")
    if component not in COMPONENTS:
        raise AdapterError(f"unknown diffusers component {component!r}; known: {', '.join(COMPONENTS)}")
    by_component: dict[str, dict[str, LoraModule]] = {}
    for name, module in adapter.modules.items():
        owner, inner = split_component(name)
        by_component.setdefault(owner or component, {})[inner] = module
    state: dict[str, torch.Tensor] = {}
    metadata: dict[str, object] = {}
    for owner, modules in sorted(by_component.items()):
        state.update(lora_tensors(modules, f"{owner}.", dtype))
        fields = {**lora_config_fields(modules), "target_modules": sorted(modules), "peft_type": "LORA"}
        metadata.update({f"{owner}.{k}": v for k, v in fields.items()})
    write_safetensors(path, state, {"format": "pt", METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)})
    return [path]
