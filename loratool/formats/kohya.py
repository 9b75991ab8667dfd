"""kohya / sd-scripts LoRA files: `lora_unet_<flat>.lora_down.weight` (= A), `.lora_up.weight` (= B),
`.alpha` (a scalar; missing means alpha = r) and LyCORIS' optional `.dora_scale`.

Module paths are flattened (`.` → `_`), which loses information, so names are resolved against the
base's real module list (`names.resolve_flat_names`). Without a base the adapter keeps the flat names:
enough to inspect it or to write it back as kohya, not to merge or convert it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoint import open_checkpoint
from ..checkpoint.writer import write_safetensors
from ..errors import AdapterError, summarize
from ..lora.module import Adapter, LayerKind, LoraModule
from .names import base_modules, flatten, resolve_flat_names, split_component

if TYPE_CHECKING:
    import torch

#: Name prefix -> the pipeline component it names. `lora_unet_` is also the main network of
#: non-pipeline models (kohya's musubi-tuner uses it for DiTs too).
PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
            "lora_te3_": "text_encoder_3", "lora_te_": "text_encoder", "lora_transformer_": "transformer"}
SUFFIXES = {".lora_down.weight": "A", ".lora_up.weight": "B", ".alpha": "alpha", ".dora_scale": "magnitude"}
#: LyCORIS tensor suffixes of other algorithms, named in the refusal.
LYCORIS_SUFFIXES = (".hada_w1_a", ".lokr_w1", ".oft_blocks", ".oft_diag", ".b_norm", ".w_norm", ".diff")


def split_kohya_name(name: str) -> tuple[str | None, str]:
    """('unet', 'down_blocks_0_...') for 'lora_unet_down_blocks_0_...'."""
    for prefix, component in PREFIXES.items():
        if name.startswith(prefix):
            return component, name[len(prefix):]
    raise AdapterError(f"{name!r} does not start with a kohya prefix ({', '.join(PREFIXES)})")


def looks_like_kohya(keys: list[str]) -> bool:
    return bool(keys) and all(k.startswith(tuple(PREFIXES)) for k in keys) and any(
        k.endswith(".lora_down.weight") for k in keys)


def read_kohya_adapter(path: Path, base: str | Path | None = None, allow_pickle: bool = False) -> Adapter:
    import torch

    with open_checkpoint(path, allow_pickle=allow_pickle) as checkpoint:
        state = {name: checkpoint.read(name) for name in checkpoint}
        metadata = next(iter(checkpoint.metadata.values()), None) or {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        name, suffix = next(((key[: -len(s)], role) for s, role in SUFFIXES.items() if key.endswith(s)), (None, None))
        if name is None:
            unknown.append(key)
            continue
        groups.setdefault(name, {})[suffix] = tensor
    if unknown:
        lycoris = any(k.endswith(LYCORIS_SUFFIXES) for k in unknown)
        hint = " (LyCORIS LoHa/LoKr/OFT tensors: not LoRA)" if lycoris else ""
        raise AdapterError(f"{path}: tensors that are not kohya LoRA{hint}: {summarize(unknown)}")
    modules = _build(groups, path)
    adapter = Adapter(path=path, source_format="kohya", modules=modules,
                      config={"kohya_metadata": dict(metadata)}, unresolved_names=True)
    return resolve_kohya_names(adapter, base, allow_pickle) if base is not None else adapter


def _build(groups: dict[str, dict[str, torch.Tensor]], source: Path) -> dict[str, LoraModule]:
    problems, modules = [], {}
    for name, parts in sorted(groups.items()):
        split_kohya_name(name)
        A, B = parts.get("A"), parts.get("B")
        if A is None or B is None:
            problems.append(f"{name} lacks lora_{'down' if A is None else 'up'}")
            continue
        rank = A.shape[0]
        if B.dim() < 2 or B.shape[1] != rank or A.dim() != B.dim():
            problems.append(f"{name}: lora_down {list(A.shape)} and lora_up {list(B.shape)} do not pair")
            continue
        alpha = float(parts["alpha"].item()) if "alpha" in parts else float(rank)
        magnitude = parts.get("magnitude")
        if magnitude is not None:
            if magnitude.numel() != B.shape[0] or (magnitude.dim() == 2 and magnitude.shape[0] == 1 and B.shape[0] != 1):
                problems.append(f"{name}: dora_scale {list(magnitude.shape)} is not one value per output unit "
                                f"({B.shape[0]}); only LyCORIS' wd_on_out layout matches PEFT's DoRA")
                continue
            magnitude = magnitude.reshape(-1)
        modules[name] = LoraModule(name=name, kind=LayerKind.CONV if A.dim() == 4 else LayerKind.LINEAR,
                                   lora_A=A, lora_B=B, alpha=alpha, magnitude=magnitude)
    if problems:
        raise AdapterError(f"{source}: {summarize(problems)}")
    if not modules:
        raise AdapterError(f"{source}: holds no LoRA tensors")
    return modules


def resolve_kohya_names(adapter: Adapter, base: str | Path | Mapping, allow_pickle: bool = False) -> Adapter:
    """The adapter with real module names, resolved against `base` (a path, or component -> modules)."""
    if not adapter.unresolved_names:
        return adapter
    index = base if isinstance(base, Mapping) else base_modules(base, allow_pickle)
    mapping = resolve_flat_names({name: split_kohya_name(name) for name in adapter.modules}, index, adapter.path)
    modules = {}
    for flat, module in adapter.modules.items():
        module.name = mapping[flat]
        modules[module.name] = module
    adapter.modules = modules
    adapter.unresolved_names = False
    return adapter


def kohya_name(module_name: str, has_second_text_encoder: bool) -> str:
    """The kohya name for a real module name (with its component prefix, if any)."""
    if module_name.startswith("lora_") and "." not in module_name:
        return module_name  # already a kohya name (read without a base)
    component, rest = split_component(module_name)
    if component in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        prefix = {"text_encoder": "lora_te1_" if has_second_text_encoder else "lora_te_",
                  "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"}[component]
    else:
        prefix, rest = "lora_unet_", rest if component in ("unet", "transformer") else module_name
    return prefix + flatten(rest)


def write_kohya_adapter(path: Path, adapter: Adapter, dtype: torch.dtype | None = None) -> list[Path]:
    """One `.safetensors` file. rsLoRA folds into alpha (alpha' = s·r), since kohya has no such flag."""
    import torch

    refused = []
    if adapter.full_tensors:
        refused.append(f"whole tensors (modules_to_save) {summarize(sorted(adapter.full_tensors))}")
    for module in adapter.modules.values():
        if module.kind is LayerKind.EMBEDDING:
            refused.append(f"embedding LoRA on {module.name}")
        if module.bias is not None:
            refused.append(f"a lora_B bias on {module.name}")
        if module.is_dora:
            refused.append(f"DoRA on {module.name} (sd-scripts has no DoRA; LyCORIS' dora_scale layouts differ)")
    if refused:
        raise AdapterError(f"kohya files cannot hold {summarize(refused)}; convert to peft instead")
    second = any(split_component(n)[0] == "text_encoder_2" for n in adapter.modules)
    state: dict[str, torch.Tensor] = {}
    names = {}
    for name, module in sorted(adapter.modules.items()):
        lora_name = kohya_name(name, second)
        if lora_name in names:
            raise AdapterError(f"{name} and {names[lora_name]} both flatten to {lora_name}")
        names[lora_name] = name
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        state[f"{lora_name}.lora_down.weight"] = cast(module.lora_A).contiguous()
        state[f"{lora_name}.lora_up.weight"] = cast(module.lora_B).contiguous()
        state[f"{lora_name}.alpha"] = torch.tensor(module.plain_alpha, dtype=torch.float32)
    ranks = sorted({m.rank for m in adapter.modules.values()})
    metadata = {"format": "pt", "ss_network_module": "networks.lora", "ss_network_dim": str(ranks[-1]),
                "ss_network_alpha": str(float(state[next(k for k in state if k.endswith('.alpha'))]))}
    write_safetensors(path, state, metadata)
    return [path]
