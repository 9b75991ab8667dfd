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
from ..layouts import KOHYA_PREFIXES as PREFIXES
from ..layouts import flatten
from ..layouts.clip import with_text_model
from ..lora.algorithms import SHARED_ROLES, build_module, split_key
from ..lora.module import Adapter, LayerKind, LoraModule
from .names import split_component

if TYPE_CHECKING:
    import torch


#: Dotted (unflattened) prefixes of ComfyUI's own LoRA saver, with kohya's tensor suffixes.
DOTTED_PREFIXES = ("diffusion_model.", "text_encoders.")


def split_kohya_name(name: str) -> tuple[str | None, str]:
    """('denoiser', 'down_blocks_0_...') for 'lora_unet_down_blocks_0_...'."""
    for prefix, component in PREFIXES.items():
        if name.startswith(prefix):
            return component, name[len(prefix):]
    if name.startswith(DOTTED_PREFIXES):
        return None, name
    raise AdapterError(f"{name!r} does not start with a kohya prefix ({', '.join(PREFIXES)})")


def looks_like_kohya(keys: list[str]) -> bool:
    """kohya/LyCORIS names, and at least one tensor of an algorithm loratool knows or refuses by name."""
    return bool(keys) and all(k.startswith(tuple(PREFIXES) + DOTTED_PREFIXES) for k in keys) and any(
        (parts := split_key(k)) is not None and parts[1] not in SHARED_ROLES for k in keys)


#: Roles of plain LoRA files, which `header_only` can describe from shapes alone.
PLAIN_ROLES = frozenset({"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"})


def read_kohya_adapter(path: Path, allow_pickle: bool = False, header_only: bool = False) -> Adapter:
    """LoRA, LoCon, LoHa, LoKr, full and norm diffs, with LyCORIS' DoRA; every module through the one
    role table and builder in `lora/algorithms`, so a bad module is named with its algorithm.
    `header_only` applies to plain LoRA files; the other algorithms are read in full."""
    with open_checkpoint(path, allow_pickle=allow_pickle) as checkpoint:
        plain = all((parts := split_key(k)) is not None and parts[1] in PLAIN_ROLES for k in checkpoint)
        state = checkpoint.load_all(header_only and plain)
        metadata = next(iter(checkpoint.metadata.values()), None) or {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        parts = split_key(key)
        if parts is None:
            unknown.append(key)
            continue
        groups.setdefault(parts[0], {})[parts[1]] = tensor
    if unknown:
        raise AdapterError(f"{path}: tensors that are not kohya/LyCORIS adapter tensors: {summarize(unknown)}")
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
                   unresolved_names=any(not n.startswith(DOTTED_PREFIXES) for n in modules))


def kohya_name(module_name: str, has_second_text_encoder: bool) -> str:
    """The kohya name for a real module name (with its component prefix, if any)."""
    if module_name.startswith("lora_") and "." not in module_name:
        return module_name  # already a kohya name (read without a base)
    component, rest = split_component(module_name)
    if component in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        prefix = {"text_encoder": "lora_te1_" if has_second_text_encoder else "lora_te_",
                  "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"}[component]
        rest = with_text_model(rest)  # the CLIP names A1111, ComfyUI and sd-scripts read (transformers 4's)
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
        if not isinstance(module, LoraModule):
            continue
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
        if not isinstance(module, LoraModule):
            state.update(_lycoris_tensors(module, lora_name, cast))
            continue
        state[f"{lora_name}.lora_down.weight"] = cast(module.lora_A).contiguous()
        state[f"{lora_name}.lora_up.weight"] = cast(module.lora_B).contiguous()
        state[f"{lora_name}.alpha"] = torch.tensor(module.plain_alpha, dtype=torch.float32)
    ranks = sorted({m.rank for m in adapter.modules.values() if m.rank is not None}) or [0]
    alphas = [float(v) for k, v in state.items() if k.endswith(".alpha")]
    lycoris = {m.algorithm for m in adapter.modules.values() if not isinstance(m, LoraModule)}
    metadata = {"format": "pt", "ss_network_module": "lycoris.kohya" if lycoris else "networks.lora",
                "ss_network_dim": str(ranks[-1]), "ss_network_alpha": str(alphas[0] if alphas else ranks[-1])}
    if len(lycoris) == 1:
        metadata["ss_network_args"] = json.dumps({"algo": next(iter(lycoris))})
    write_safetensors(path, state, metadata)
    return [path]


def _lycoris_tensors(module, lora_name: str, cast) -> dict[str, torch.Tensor]:
    """A LyCORIS module's tensors under its kohya name, refused where a reader would get another scale
    (a PEFT LoKr with both halves full has scale alpha/r; LyCORIS files define it as 1)."""
    import torch

    parts = {key[len(module.name) + 1:]: tensor for key, tensor in module.named_tensors().items()}
    if "bias" in parts:
        raise AdapterError(f"{module.name}: kohya/LyCORIS files have no place for a {module.algorithm} bias")
    if module.alpha is not None:
        parts["alpha"] = torch.tensor(float(module.alpha), dtype=torch.float32)
    reread = build_module(lora_name, parts)
    if abs(reread.scale - module.scale) > 1e-6 * max(1.0, abs(module.scale)):
        raise AdapterError(f"{module.name}: a {module.algorithm} module with scale {module.scale:g} reads back from a "
                           f"LyCORIS file with scale {reread.scale:g}; convert to peft instead")
    return {f"{lora_name}.{role}": cast(t).contiguous() if role != "alpha" else t for role, t in parts.items()}
