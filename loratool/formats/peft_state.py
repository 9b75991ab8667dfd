"""Whole-model checkpoints saved from a PEFT-wrapped model (`peft_model.state_dict()`, or a trainer's
full checkpoint): `<module>.base_layer.weight` beside `<module>.lora_A.<adapter>.weight`,
`lora_B`, `lora_embedding_A/B`, `lora_magnitude_vector`, and `modules_to_save.<adapter>` /
`original_module` copies, usually under `base_model.model.`.

Scales come from an `adapter_config.json` beside the checkpoint when there is one, else `--alpha`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoint import Checkpoint, open_checkpoint
from ..errors import AdapterError, summarize
from ..lora.module import Adapter
from ..lora.kinds import LayerKind
from ..lora.algorithms import LoraModule
from ..lora.scaling import pattern_value
from . import ReadOptions
from .peft import CONFIG_NAME, KEY_PREFIX, _check_config, load_config_json

if TYPE_CHECKING:
    import torch

#: `<module>.<part>.<adapter>[.weight|.bias]` for the LoRA parts of a wrapped layer.
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
                      r"\.(?!weight$|bias$)(?P<adapter>[^.]+)(?P<param>\.weight|\.bias)?$")
SAVED_KEY = re.compile(r"^(?P<module>.+)\.modules_to_save\.(?P<adapter>[^.]+)\.(?P<param>.+)$")
ROLES = {"lora_A": "A", "lora_B": "B", "lora_embedding_A": "A", "lora_embedding_B": "B",
         "lora_magnitude_vector": "magnitude"}


def looks_like(keys: list[str]) -> bool:
    return any(".base_layer." in k for k in keys) and any(LORA_KEY.match(k) for k in keys)


def strip_prefix(key: str) -> str:
    return key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key


def clean_base_name(key: str) -> str | None:
    """The plain model's name for a tensor of the wrapped model; None for adapter-only tensors."""
    key = strip_prefix(key)
    if LORA_KEY.match(key) or SAVED_KEY.match(key):
        return None
    return key.replace(".base_layer.", ".").replace(".original_module.", ".")


def _config(path: Path, alpha: float | None) -> dict:
    folder = path if path.is_dir() else path.parent
    config_path = folder / CONFIG_NAME
    if config_path.is_file():
        config = load_config_json(config_path)
        _check_config(config, config_path)
        return config
    if alpha is None:
        raise AdapterError(f"{path}: a PEFT-wrapped state dict does not store lora_alpha and no {CONFIG_NAME} is beside "
                           "it; pass --alpha with the training value")
    return {"lora_alpha": alpha}


def read(path: Path, options: ReadOptions) -> Adapter:
    config = _config(path, options.alpha)
    with open_checkpoint(path, allow_pickle=options.allow_pickle, quantized=False) as checkpoint:
        parts, saved, names = _collect(checkpoint)
    if len(names) != 1:
        found = ", ".join(sorted(names)) or "none"
        raise AdapterError(f"{path}: expected one LoRA adapter in the wrapped state dict, found: {found}")
    problems, modules = [], {}
    rslora = bool(config.get("use_rslora", False))
    for name, roles in sorted(parts.items()):
        A, B = roles.get("A"), roles.get("B")
        if A is None or B is None:
            problems.append(f"{name} lacks {'lora_A' if A is None else 'lora_B'}")
            continue
        kind = roles.pop("kind", None) or (LayerKind.CONV if A.dim() > 2 else LayerKind.LINEAR)
        rank = A.shape[0]
        module_alpha = float(pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", rank)))
        magnitude = roles.get("magnitude")
        modules[name] = LoraModule(name=name, kind=kind, lora_A=A, lora_B=B, alpha=module_alpha, use_rslora=rslora,
                                   magnitude=magnitude.reshape(-1) if magnitude is not None else None,
                                   bias=roles.get("bias"))
    if problems:
        raise AdapterError(f"{path}: {summarize(problems)}")
    return Adapter(path=path, source_format="peft-state", modules=modules, full_tensors=saved, config=config)


def _collect(checkpoint: Checkpoint):

    parts: dict[str, dict] = {}
    saved: dict[str, torch.Tensor] = {}
    names: set[str] = set()
    for key in checkpoint:
        stripped = strip_prefix(key)
        match = LORA_KEY.match(stripped)
        if match:
            names.add(match["adapter"])
            role = "bias" if match["param"] == ".bias" else ROLES[match["part"]]
            entry = parts.setdefault(match["module"], {})
            entry[role] = checkpoint.read(key)
            if "embedding" in match["part"]:
                entry["kind"] = LayerKind.EMBEDDING
            continue
        match = SAVED_KEY.match(stripped)
        if match:
            names.add(match["adapter"])
            saved[f"{match['module']}.{match['param']}"] = checkpoint.read(key)
    return parts, saved, names
