"""Build a `Component` from a base's tensor names and shapes, one builder per layout.

Each builder sees the component's tensors with their storage prefix removed, and records the full
tensor name (prefix put back) in every `Target`.
"""

from __future__ import annotations

from collections.abc import Mapping

from . import clip, unet
from .dit import DitFamily
from .index import Component, Target

Shapes = Mapping[str, tuple[int, ...]]
WEIGHT = ".weight"


def _modules(shapes: Shapes) -> list[str]:
    return sorted(k[: -len(WEIGHT)] for k in shapes if k.endswith(WEIGHT))


def _target(shapes: Shapes, module: str, prefix: str, source: str | None, **extra) -> Target:
    bias = f"{module}.bias" if f"{module}.bias" in shapes else None
    return Target(source=source, weight=f"{prefix}{module}{WEIGHT}", bias=f"{prefix}{bias}" if bias else None,
                  shape=tuple(shapes[f"{module}{WEIGHT}"]), **extra)


def transformers_model(shapes: Shapes, source: str | None = None, name: str | None = None,
                       prefix: str = "") -> Component:
    """A plain model (an LLM, or anything without a known diffusion layout): names as stored, and the
    weight's orientation decided later from shapes (HF `Conv1D` stores (in, out))."""
    def fill(component: Component) -> None:
        for module in _modules(shapes):
            component.add(module, _target(shapes, module, prefix, source, transposed=None))

    return Component(name=name, layout="transformers", build=fill)


def ldm_unet(shapes: Shapes, prefix: str, source: str | None = None) -> Component:
    component = Component(name="unet", layout="ldm-unet")
    modules = _modules(shapes)
    per_level = unet.ldm_per_level(modules)
    for module in modules:
        canonical = unet.ldm_to_diffusers(module, per_level) or module
        component.add(canonical, _target(shapes, module, prefix, source), module)
    return component


def diffusers_unet(shapes: Shapes, source: str | None = None, prefix: str = "") -> Component:
    component = Component(name="unet", layout="diffusers-unet")
    modules = _modules(shapes)
    per_level = unet.diffusers_per_level(modules)
    attention = unet.up_levels_with_attention(modules)
    for module in modules:
        ldm = unet.diffusers_to_ldm(module, per_level, attention.__contains__)
        component.add(module, _target(shapes, module, prefix, source), ldm or "")
    return component


def hf_clip(shapes: Shapes, name: str, prefix: str = "", source: str | None = None,
            keep_stored_names: bool = True) -> Component:
    """A Hugging Face CLIP text encoder. Module names are canonical as the base stores them in a
    diffusers folder; LDM files keep transformers 4's `text_model.` level, which canonical names drop
    (transformers 5's naming). Both spellings are aliases."""
    component = Component(name=name, layout="hf-clip")
    for module in _modules(shapes):
        bare = clip.without_text_model(module)
        canonical = module if keep_stored_names else bare
        component.add(canonical, _target(shapes, module, prefix, source), bare, clip.with_text_model(bare))
    return component


def open_clip(shapes: Shapes, name: str, prefix: str, source: str | None = None) -> Component:
    """An OpenCLIP text encoder (SD2, SDXL's bigG) under Hugging Face names, q/k/v as row slices of
    `in_proj_weight`."""
    component = Component(name=name, layout="open-clip")
    fused: dict[str, tuple[str, ...]] = {}
    for key, shape in sorted(shapes.items()):
        mapped = clip.open_clip_tensor(key)
        if mapped is None or mapped[1] == "bias":
            continue
        modules, _, transposed = mapped
        bias_key = _bias_key(key, shapes)
        native = clip.open_clip_module(key)
        bias = prefix + bias_key if bias_key else None
        if len(modules) == 1:
            component.add(modules[0], Target(source, prefix + key, bias, transposed=transposed, shape=tuple(shape)), native,
                          clip.with_text_model(modules[0]))
            continue
        size = shape[0] // len(modules)
        for i, module in enumerate(modules):
            rows = (i * size, (i + 1) * size)
            component.add(module, Target(source, prefix + key, bias, rows=rows, shape=tuple(shape)),
                          clip.with_text_model(module))
        fused[native] = modules
    for native, modules in fused.items():
        size = component.targets[modules[0]].rows[1]
        component.add_group(native, tuple((m, (i * size, (i + 1) * size), False) for i, m in enumerate(modules)))
    return component


def _bias_key(key: str, shapes: Shapes) -> str | None:
    if key.endswith("in_proj_weight"):
        candidate = key[: -len("weight")] + "bias"
    elif key.endswith(WEIGHT):
        candidate = key[: -len(WEIGHT)] + ".bias"
    else:
        return None
    return candidate if candidate in shapes else None


def dit_native(shapes: Shapes, family: DitFamily, prefix: str = "", source: str | None = None) -> Component:
    """A DiT single file in its native names: canonical modules are diffusers', held in row slices of
    the native tensors where the native model fuses them; the native names are aliases."""
    component = Component(name="transformer", layout=family.native_layout)
    swapped_halves = family.swapped(shapes)
    for key, shape in sorted(shapes.items()):
        param = key.rsplit(".", 1)[-1]
        if param not in ("weight", family.norm_param):
            continue
        module = key[: -len(param) - 1]
        parts = family.native_to_diffusers(module)
        bias_key = f"{module}.bias" if f"{module}.bias" in shapes else None
        bias = prefix + bias_key if bias_key else None
        if parts is None:
            component.add(module, Target(source, prefix + key, bias, shape=tuple(shape)))
            continue
        if len(parts) == 1:
            swapped = module in swapped_halves
            component.add(parts[0], Target(source, prefix + key, bias, swap_halves=swapped, shape=tuple(shape)))
            component.add_group(module, ((parts[0], None, swapped),))
            continue
        sizes = family.fused_rows(module, shape[0], shape[1] if len(shape) > 1 else 1, len(parts))
        group, start = [], 0
        for part, size in zip(parts, sizes):
            rows = (start, start + size)
            component.add(part, Target(source, prefix + key, bias, rows=rows, shape=tuple(shape)))
            group.append((part, rows, False))
            start += size
        component.add_group(module, tuple(group))
    return component


def dit_diffusers(shapes: Shapes, family: DitFamily, source: str | None = None, prefix: str = "") -> Component:
    """A DiT saved by diffusers: names as stored; each native module is an alias of the diffusers modules
    it fuses, with the rows of a native-named LoRA's B that feed each."""
    component = Component(name="transformer", layout=family.diffusers_layout)
    modules = _modules(shapes)
    swapped_halves = family.swapped(shapes)
    for module in modules:
        component.add(module, _target(shapes, module, prefix, source))
    for native, parts in family.diffusers_groups(set(modules)).items():
        if len(parts) == 1:
            component.add_group(native, ((parts[0], None, native in swapped_halves),))
            continue
        group, start = [], 0
        for part in parts:
            size = shapes[f"{part}{WEIGHT}"][0]
            group.append((part, (start, start + size), False))
            start += size
        component.add_group(native, tuple(group))
    return component
