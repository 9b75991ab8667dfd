"""kohya / sd-scripts LoRA files: `lora_unet_<flat>.lora_down.weight` (= A), `.lora_up.weight` (= B),
`.alpha` (a scalar; missing means alpha = r), and the LyCORIS algorithms written in the same scheme
(LoCon `lora_mid`, LoHa `hada_*`, LoKr `lokr_*`, full `diff`/`diff_b`, norms `w_norm`/`b_norm`,
`dora_scale`), under `lora_unet_`/`lora_te*_`/`lycoris_` and ComfyUI's dotted prefixes.

Module paths are flattened (`.` → `_`), which loses information, so the reader keeps the flat names
and `layouts.BaseLayout.resolve` maps them through the base's real module list, in any dialect the
base's layout knows (diffusers or LDM UNet names, BFL or diffusers Flux names, CLIP with or without
`text_model.`). Without a base the names are enough to inspect the file or write it back as kohya.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoint import open_checkpoint
from ..checkpoint.writer import write_safetensors
from ..errors import AdapterError, summarize
from ..layouts import COMFYUI_PREFIXES, KOHYA_PREFIXES, flatten, kohya_prefix
from ..layouts.clip import with_text_model
from ..lora.algorithms import SHARED_ROLES, build_module, split_key
from ..lora.module import Adapter
from ..lora.kinds import LayerKind
from . import ReadOptions, WriteOptions
from .names import split_component

if TYPE_CHECKING:
    import torch


#: Name prefixes of files in kohya's scheme: sd-scripts'/LyCORIS' flat ones and ComfyUI's dotted ones
#: (both tables in `layouts`, which also maps them to components).
FLAT_PREFIXES = tuple(KOHYA_PREFIXES)
COMFYUI_DOTTED = tuple(COMFYUI_PREFIXES)


def split_kohya_name(name: str) -> tuple[str | None, str]:
    """('denoiser', 'down_blocks_0_...') for 'lora_unet_down_blocks_0_...'."""
    for prefix, component in KOHYA_PREFIXES.items():
        if name.startswith(prefix):
            return component, name[len(prefix):]
    if name.startswith(COMFYUI_DOTTED):
        return None, name
    raise AdapterError(f"{name!r} does not start with a kohya prefix ({', '.join(FLAT_PREFIXES)})")


def looks_like(keys: list[str]) -> bool:
    """kohya/LyCORIS names, and at least one tensor of an algorithm loratool knows or refuses by name. A
    bare `.weight` is no evidence: a model saved under `diffusion_model.` is all `.weight`s and `.bias`es."""
    return bool(keys) and all(k.startswith(FLAT_PREFIXES + COMFYUI_DOTTED) for k in keys) and any(
        (parts := split_key(k)) is not None and parts[1] not in (*SHARED_ROLES, "weight") for k in keys)


#: Roles of plain LoRA files, which `header_only` can describe from shapes alone.
PLAIN_ROLES = frozenset({"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"})


def read(path: Path, options: ReadOptions) -> Adapter:
    """LoRA, LoCon, LoHa, LoKr, full and norm diffs, with LyCORIS' DoRA; every module through the one
    role table and builder in `lora/algorithms`, so a bad module is named with its algorithm.
    `header_only` applies to plain LoRA files; the other algorithms are read in full."""
    with open_checkpoint(path, allow_pickle=options.allow_pickle, quantized=False) as checkpoint:
        plain = all((parts := split_key(k)) is not None and parts[1] in PLAIN_ROLES for k in checkpoint)
        state = checkpoint.load_all(options.header_only and plain)
        metadata = next(iter(checkpoint.metadata.values()), None) or {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown, twice = [], []
    for key, tensor in state.items():
        parts = split_key(key)
        if parts is None:
            unknown.append(key)
            continue
        group = groups.setdefault(parts[0], {})
        if parts[1] in group:  # `x.lora_A.weight` beside `x.lora_down.weight`: two spellings of one tensor
            twice.append(f"{parts[0]}.{parts[1]}")
        group[parts[1]] = tensor
    if unknown:
        raise AdapterError(f"{path}: tensors that are not kohya/LyCORIS adapter tensors: {summarize(unknown)}")
    if twice:
        raise AdapterError(f"{path}: tensors given twice under two spellings: {summarize(twice)}")
    modules, problems = {}, []
    for name, parts in sorted(groups.items()):
        split_kohya_name(name)
        try:
            modules[name] = build_module(name, parts)
        except AdapterError as e:
            problems.append(str(e))
    if problems:
        raise AdapterError(f"{path}: {summarize(problems)}")
    if not modules:
        raise AdapterError(f"{path}: holds no adapter tensors")
    return Adapter(path=path, source_format="kohya", modules=modules, config={"kohya_metadata": dict(metadata)},
                   unresolved_names=any(not n.startswith(COMFYUI_DOTTED) for n in modules))


def kohya_name(module_name: str, has_second_text_encoder: bool) -> str:
    """The kohya name for a real module name (with its component prefix, if any)."""
    if module_name.startswith("lora_") and "." not in module_name:
        return module_name  # already a kohya name (read without a base)
    component, rest = split_component(module_name)
    prefix = kohya_prefix(component, text_encoders=2 if has_second_text_encoder else 1)
    if prefix is None:  # no component (bare denoiser names), or one kohya has no prefix for
        prefix, rest = kohya_prefix("denoiser"), module_name
    elif component.startswith("text_encoder"):
        rest = with_text_model(rest)  # the CLIP names A1111, ComfyUI and sd-scripts read (transformers 4's)
    return prefix + flatten(rest)


def write(path: Path, adapter: Adapter, options: WriteOptions) -> list[Path]:
    """One `.safetensors` file. rsLoRA folds into alpha (alpha' = s·r), since kohya has no such flag."""
    import torch

    refused = []
    if adapter.full_tensors:
        refused.append(f"whole tensors (modules_to_save) {summarize(sorted(adapter.full_tensors))}")
    for module in adapter.modules.values():
        if module.kind is LayerKind.EMBEDDING:
            refused.append(f"embedding LoRA on {module.name}")
        if module.plain_lora and module.bias is not None:
            refused.append(f"a lora_B bias on {module.name}")
        if module.plain_lora and module.is_dora:
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
        cast = (lambda t: t.to(options.dtype)) if options.dtype is not None else (lambda t: t)
        state.update(_file_tensors(module, lora_name, cast))
    ranks = sorted({m.rank for m in adapter.modules.values() if m.rank is not None}) or [0]
    alphas = [float(v) for k, v in state.items() if k.endswith(".alpha")]
    lycoris = {m.algorithm for m in adapter.modules.values() if not m.plain_lora}
    metadata = {"format": "pt", "ss_network_module": "lycoris.kohya" if lycoris else "networks.lora",
                "ss_network_dim": str(ranks[-1]), "ss_network_alpha": str(alphas[0] if alphas else ranks[-1])}
    if len(lycoris) == 1:
        metadata["ss_network_args"] = json.dumps({"algo": next(iter(lycoris))})
    write_safetensors(path, state, metadata)
    return [path]


def _file_tensors(module, lora_name: str, cast) -> dict[str, torch.Tensor]:
    """A module's tensors under its kohya name (the roles its class owns, `.alpha`, `.dora_scale`),
    refused where a reader would get another scale (a PEFT LoKr with both halves full has scale alpha/r;
    LyCORIS files define it as 1) or where the file has no place for a tensor."""
    import torch

    parts = dict(module.tensors())
    if module.bias is not None and not any(t is module.bias for t in parts.values()):
        raise AdapterError(f"{module.name}: kohya/LyCORIS files have no place for a {module.algorithm} bias")
    if module.magnitude is not None:
        parts["dora_scale"] = module.magnitude
    if module.plain_alpha is not None:
        parts["alpha"] = torch.tensor(float(module.plain_alpha), dtype=torch.float32)
    reread = build_module(lora_name, parts)
    if abs(reread.scale - module.scale) > 1e-6 * max(1.0, abs(module.scale)):
        raise AdapterError(f"{module.name}: a {module.algorithm} module with scale {module.scale:g} reads back from a "
                           f"LyCORIS file with scale {reread.scale:g}; convert to peft instead")
    return {f"{lora_name}.{role}": cast(t).contiguous() if role != "alpha" else t for role, t in parts.items()}
