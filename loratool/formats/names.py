"""Module names across dialects: pipeline components, and the base's module list that lossy names
(kohya's `.` → `_`) are resolved against."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from ..checkpoint import open_checkpoint
from ..errors import AdapterError, summarize

#: diffusers pipeline components that LoRA files name as their first key component.
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior", "controlnet")
WEIGHT_SUFFIX = ".weight"


def split_component(name: str) -> tuple[str | None, str]:
    """('unet', 'down_blocks.0...') for a component-prefixed name; (None, name) otherwise."""
    head, _, rest = name.partition(".")
    return (head, rest) if head in COMPONENTS and rest else (None, name)


def components_of(names: Iterable[str]) -> list[str | None]:
    return sorted({split_component(n)[0] for n in names}, key=lambda c: (c is not None, c or ""))


def modules_of(keys: Iterable[str]) -> set[str]:
    """Module paths that own a `.weight` tensor."""
    return {k[: -len(WEIGHT_SUFFIX)] for k in keys if k.endswith(WEIGHT_SUFFIX)}


def base_modules(base: str | os.PathLike, allow_pickle: bool = False) -> dict[str | None, set[str]]:
    """Component -> module paths of a base: a checkpoint (component None) or a diffusers pipeline
    folder (`model_index.json`, one component per subfolder)."""
    base = Path(base)
    if (base / "model_index.json").is_file():
        found: dict[str | None, set[str]] = {}
        index = json.loads((base / "model_index.json").read_text())
        for component in index:
            folder = base / component
            if folder.is_dir() and any(folder.glob("*.safetensors")):
                with open_checkpoint(folder, allow_pickle=allow_pickle) as checkpoint:
                    found[component] = modules_of(checkpoint)
        return found
    with open_checkpoint(base, allow_pickle=allow_pickle) as checkpoint:
        return {None: modules_of(checkpoint)}


def flatten(module: str) -> str:
    return module.replace(".", "_")


def resolve_flat_names(flat_names: dict[str, tuple[str | None, str]], base: dict[str | None, set[str]],
                       source: Path) -> dict[str, str]:
    """Map kohya-style names to real module names; `flat_names` maps each name to (the component its
    prefix names, the flattened module path after the prefix).

    A flat name resolves to the base module whose path, with `.` replaced by `_`, equals it. With a
    pipeline base the module gets its component prefix; with a single-model base every prefix
    resolves against that model. No match, or several, is an error that lists them.
    """
    indexes: dict[str | None, dict[str, list[str]]] = {}
    for component, modules in base.items():
        index: dict[str, list[str]] = {}
        for module in modules:
            index.setdefault(flatten(module), []).append(module)
        indexes[component] = index
    resolved, missing, ambiguous = {}, [], []
    for flat, (component, rest) in flat_names.items():
        key = component if component in indexes else (None if None in indexes else _fallback(component, indexes))
        candidates = sorted(indexes.get(key, {}).get(rest, []))
        if len(candidates) == 1:
            resolved[flat] = f"{key}.{candidates[0]}" if key else candidates[0]
        elif candidates:
            ambiguous.append(f"{flat} -> {' or '.join(candidates)}")
        else:
            missing.append(flat)
    if ambiguous:
        raise AdapterError(f"{source}: kohya names that match several base modules: {summarize(ambiguous)}")
    if missing:
        raise AdapterError(
            f"{source}: kohya names with no module in the base: {summarize(missing)}; is --base the model this "
            "LoRA was trained on?"
        )
    return resolved


def _fallback(component: str | None, indexes: dict) -> str | None:
    """kohya's `lora_unet_` also names the denoiser of pipelines that have a transformer instead."""
    if component == "unet" and "transformer" in indexes:
        return "transformer"
    return component
