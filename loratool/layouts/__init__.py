"""Base layouts: how each kind of base names its weights, and one resolver from a module name in any
LoRA dialect to the base tensors it updates.

| layout               | family           | components                                                         |
|----------------------|------------------|--------------------------------------------------------------------|
| `ldm-single-file`    | SD1, SD2, SDXL   | `model.diffusion_model.*` (UNet, LDM names), CLIP / OpenCLIP text encoders |
| `diffusers-pipeline` | from model_index | one folder per component, diffusers / transformers names           |
| `diffusers-unet`     | SD1, SD2, SDXL   | a UNet saved by diffusers                                          |
| `flux-bfl`           | Flux             | BFL names (`double_blocks`, fused `qkv`/`linear1`)                 |
| `flux-diffusers`     | Flux             | diffusers names (`transformer_blocks`, separate q/k/v)             |
| `dit-native`         | (unknown)        | a diffusion transformer under `model.diffusion_model.`: names as stored |
| `hf-clip`            | CLIP             | a Hugging Face CLIP text encoder                                   |
| `transformers`       | the architecture | anything else: names as stored (LLMs)                              |

Diffusion-transformer families are tables read by one builder pair (`dit.py`, registry in
`dit_families.py`). Canonical module names are diffusers' (and transformers 5's for text encoders), qualified by the
pipeline component for diffusion bases (`unet.down_blocks.0…`, `text_encoder_2.encoder.layers.3…`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MismatchError, summarize
from . import build
from .families import cross_attention_family
from .dit import GENERIC, KeyIndex
from .dit_families import FAMILIES
from .index import Component, Piece, Rows, Target, flatten, name_transforms

__all__ = ["BaseLayout", "Component", "Piece", "Rows", "Target", "flatten", "layout_of", "open_base",
           "DIFFUSION_COMPONENTS", "KOHYA_PREFIXES", "COMFYUI_PREFIXES", "DOTTED_PREFIXES", "kohya_prefix",
           "split_prefix"]

LDM_UNET = "model.diffusion_model."
#: Prefixes savers put before a diffusion transformer's native names (ComfyUI's first).
DIT_FILE_PREFIXES = (LDM_UNET, "diffusion_model.")
#: LDM single-file text-encoder prefixes -> (component, builder, family hint).
LDM_TEXT_ENCODERS = {
    "cond_stage_model.transformer.": ("text_encoder", "hf"),
    "cond_stage_model.model.": ("text_encoder", "open"),
    "conditioner.embedders.0.transformer.": ("text_encoder", "hf"),
    "conditioner.embedders.1.model.": ("text_encoder_2", "open"),
}
REFINER_TEXT_ENCODER = "conditioner.embedders.0.model."
#: A DiT single file's text encoders, as SAI and ComfyUI save them beside `model.diffusion_model.` (SD3/SD3.5:
#: CLIP-L, CLIP-G, T5-XXL), Hugging Face names -> (component, builder), the components `COMFYUI_PREFIXES` and
#: `KOHYA_PREFIXES` name for their LoRAs.
DIT_TEXT_ENCODERS = {"text_encoders.clip_l.transformer.": ("text_encoder", "hf"),
                     "text_encoders.clip_g.transformer.": ("text_encoder_2", "hf"),
                     "text_encoders.t5xxl.transformer.": ("text_encoder_3", "t5")}
#: diffusers pipeline components that LoRAs adapt.
DIFFUSION_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior",
                        "controlnet")
DENOISERS = ("unet", "transformer", "prior")
#: kohya/LyCORIS flat-name prefix -> the component it names ("denoiser": the UNet or the DiT, whichever
#: the base has). The one prefix table, read both ways: readers accept every prefix, and the writer
#: takes `kohya_prefix(component)`, the first prefix listed for the component.
KOHYA_PREFIXES = {"lora_unet_": "denoiser", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
                  "lora_te3_": "text_encoder_3", "lora_te_": "text_encoder", "lora_transformer_": "denoiser",
                  "lycoris_": "denoiser"}
#: The single text encoder of SD1/SD2 is `lora_te_`; `lora_te1_` names the first of two (SDXL).
SOLE_TEXT_ENCODER_PREFIX = "lora_te_"
#: Dotted prefixes of ComfyUI's own LoRA saver -> component. Its files use kohya's tensor suffixes
#: (`lora_down`/`lora_up`/`alpha`) on dotted module names, so kohya's detection accepts these too.
COMFYUI_PREFIXES = {"diffusion_model.": "denoiser",
                    "text_encoders.clip_l.transformer.": "text_encoder", "text_encoders.clip_l.": "text_encoder",
                    "text_encoders.clip_g.transformer.": "text_encoder_2", "text_encoders.clip_g.": "text_encoder_2",
                    "text_encoders.t5xxl.transformer.": "text_encoder_3", "text_encoders.t5xxl.": "text_encoder_3"}
#: Every dotted (unflattened) module-name prefix -> component: ComfyUI's, the LDM single file's, and the
#: diffusers pipeline components' own (`unet.`, `text_encoder_2.`, …).
DOTTED_PREFIXES = {**COMFYUI_PREFIXES, "model.diffusion_model.": "denoiser",
                   **{f"{c}.": c for c in DIFFUSION_COMPONENTS}}


@dataclass
class BaseLayout:
    path: Path
    kind: str
    family: str | None
    components: dict[str | None, Component] = field(default_factory=dict)
    #: The `config.json` beside a single-checkpoint base (None for pipelines, or when there is none).
    config: dict | None = None
    #: What the base is beyond its family (a size, a task: `14B I2V`), where the family's table tells.
    variant: str | None = None

    @property
    def denoiser(self) -> str | None:
        return next((c for c in DENOISERS if c in self.components), None)

    def describe(self) -> dict:
        return {"layout": self.kind, "family": self.family, "variant": self.variant,
                "components": {name or "model": c.layout for name, c in self.components.items()}}

    @property
    def native_dit(self) -> bool:
        """A diffusion transformer in its own (native) names, as musubi-tuner and ComfyUI name its LoRAs."""
        return any(self.kind == family.native_layout for family in FAMILIES)

    def native_name(self, module: str) -> tuple[str, bool] | None:
        """(the base's own name, halves swapped) for a canonical module that one native module holds
        alone, e.g. `transformer.blocks.0.attn1.to_q` -> `transformer.blocks.0.self_attn.q` in a Wan file;
        None for parts of a fused native tensor and for modules the tables do not rename."""
        component_name, _, path = module.partition(".") if None not in self.components else (None, "", module)
        component = self.components.get(component_name)
        found = component.sole_alias(path) if component is not None else None
        return None if found is None else (component.qualified(found[0]), found[1])

    def summary(self) -> str:
        """`ldm-single-file SDXL: unet (ldm-unet), text_encoder (hf-clip), …`, for error messages."""
        head = f"{self.kind} {self.family or ''}".rstrip()
        parts = [f"{name} ({c.layout})" for name, c in self.components.items() if name is not None]
        return f"{head}: {', '.join(parts)}" if parts else head

    # --- resolution -------------------------------------------------------------------------------

    def _component_for(self, hint: str | None) -> list[Component]:
        if None in self.components:
            return [self.components[None]]
        if hint is None:
            return list(self.components.values())
        if hint in ("denoiser", "unet", "transformer", "prior"):
            hint = self.denoiser if hint == "denoiser" or hint not in self.components else hint
        return [self.components[hint]] if hint in self.components else []

    def resolve(self, names: Iterable[str], flat: bool = False, source: object = None,
                skip_missing: bool = False) -> dict[str, tuple[Piece, ...]]:
        """Adapter module name -> the pieces it updates. `flat` names are kohya's (`lora_unet_…`).

        Raises MismatchError naming a few unmatched or ambiguous names and the detected layout: an
        ambiguous name is never guessed. With `skip_missing`, names the base lacks are left out of the
        result instead (the caller reports them); ambiguous ones are still refused.
        """
        names = list(names)
        resolved: dict[str, tuple[Piece, ...]] = {}
        missing, ambiguous, no_component = [], [], set()
        transforms = self._generic_transforms(names, flat)
        for name in names:
            is_flat = flat and name.startswith(tuple(KOHYA_PREFIXES))
            hint, path = split_prefix(name, is_flat)
            components = self._component_for(hint)
            if not components:
                no_component.add(hint)
                missing.append(name)
                continue
            found: list[tuple[Piece, ...]] = []
            for component in components:
                found += _lookup(component, path, is_flat, transforms.get(id(component)))
            distinct = list(dict.fromkeys(found))
            if len(distinct) == 1:
                resolved[name] = distinct[0]
            elif distinct:
                ambiguous.append(f"{name} -> {' or '.join('+'.join(p.module for p in ps) for ps in distinct)}")
            else:
                missing.append(name)
        who = f"{source}: " if source is not None else ""
        if ambiguous:
            raise MismatchError(f"{who}module names that match several modules of the base {self.path} "
                                f"({self.summary()}): {summarize(ambiguous)}")
        if missing and not skip_missing:
            hint = ""
            if self.family is None:
                tried = ", ".join(f.name for f in FAMILIES)
                hint = (f"; no family table matched the base (DiT families tried: {tried}), so names were matched "
                        "as stored")
            if no_component - {None}:
                wanted = ", ".join(sorted(str(c) for c in no_component - {None}))
                hint += f"; the base has no {wanted} (merge into a base that has it, e.g. a full single file or pipeline)"
            raise MismatchError(f"{who}targets {len(missing)} module(s) the base does not have: {summarize(missing)} "
                                f"(base {self.path}: {self.summary()}){hint}; is this the model the LoRA was trained "
                                "on? (--skip-missing merges the rest)")
        return resolved

    def _generic_transforms(self, names: list[str], flat: bool) -> dict[int, object]:
        """For plain models, one name transform for the whole adapter (adapters name modules as the
        trained class did, `model.layers.0…`, while a base may be saved from another class)."""
        chosen = {}
        for component in self.components.values():
            if component.layout != "transformers" or flat:
                continue
            paths = [split_prefix(n, False)[1] for n in names]
            best, best_hits = None, -1
            for transform in name_transforms(component.targets):
                hits = sum(transform(p) in component.targets for p in paths)
                if hits > best_hits:
                    best, best_hits = transform, hits
            chosen[id(component)] = best
        return chosen


def _lookup(component: Component, path: str, flat: bool, transform) -> list[tuple[Piece, ...]]:
    if flat:
        return component.flat_candidates(path)
    pieces = component.pieces(transform(path) if transform else path)
    return [pieces] if pieces else []


def kohya_prefix(component: str | None, text_encoders: int = 1) -> str | None:
    """The flat-name prefix kohya's writer uses for a pipeline component (`KOHYA_PREFIXES` read
    backwards): `lora_unet_` for the denoiser (UNet, DiT or prior), `lora_te_` for the text encoder of a
    one-encoder model and `lora_te1_` when there are `text_encoders` > 1, `lora_te2_`/`lora_te3_`
    after it; None for a component kohya has no prefix for."""
    if component in DENOISERS:
        component = "denoiser"
    if component == "text_encoder" and text_encoders < 2:
        return SOLE_TEXT_ENCODER_PREFIX
    return next((prefix for prefix, named in KOHYA_PREFIXES.items() if named == component), None)


def split_prefix(name: str, flat: bool) -> tuple[str | None, str]:
    """(component hint, module path) of an adapter module name."""
    table = KOHYA_PREFIXES if flat else DOTTED_PREFIXES
    for prefix in sorted(table, key=len, reverse=True):
        if name.startswith(prefix):
            return table[prefix], name[len(prefix):]
    return None, name


# --- detection ----------------------------------------------------------------------------------------


def _under(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def _unet_family(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    return cross_attention_family(shape[1] for key, shape in shapes.items()
                                  if key.endswith("attn2.to_k.weight") and len(shape) == 2)


def _is_clip(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    return any(k.endswith("encoder.layers.0.self_attn.q_proj.weight") for k in shapes) and any(
        k.endswith("embeddings.token_embedding.weight") for k in shapes)


def layout_of(shapes: Mapping[str, tuple[int, ...]], path: Path, config: dict | None = None,
              source: str | None = None, component: str | None = None) -> BaseLayout:
    """Detect the layout of one checkpoint from its tensor names and shapes (headers only)."""
    dit = _dit_layout(shapes, path, source)
    if dit is not None:
        return dit
    if any(k.startswith(LDM_UNET) for k in shapes):
        return _ldm_single_file(shapes, path, source)
    if any(k.startswith("down_blocks.") and ".resnets." in k for k in shapes) and "conv_in.weight" in shapes:
        return BaseLayout(path, "diffusers-unet", _unet_family(shapes), {"unet": build.diffusers_unet(shapes, source)})
    if _is_clip(shapes) and (component is None or component.startswith("text_encoder")):
        name = component or "text_encoder"
        return BaseLayout(path, "hf-clip", "CLIP", {name: build.hf_clip(shapes, name, source=source,
                                                                         keep_stored_names=True)})
    architectures = (config or {}).get("architectures") or []
    family = architectures[0] if architectures else (config or {}).get("model_type")
    return BaseLayout(path, "transformers", family, {component: build.transformers_model(shapes, source, component)})


def _dit_layout(shapes: Mapping[str, tuple[int, ...]], path: Path, source: str | None) -> BaseLayout | None:
    """A diffusion transformer of a known family: native names bare or under a saver's prefix
    (`model.diffusion_model.` as ComfyUI saves, `diffusion_model.`), or diffusers names."""
    for prefix in (*DIT_FILE_PREFIXES, ""):
        inner = _under(shapes, prefix) if prefix else shapes
        if not inner:
            continue
        index = KeyIndex(inner)
        for family in FAMILIES:
            if family.is_native(index):
                return BaseLayout(path, family.native_layout, family.name,
                                  {"transformer": build.dit_native(inner, family, prefix, source),
                                   **_dit_text_encoders(shapes, prefix, source)},
                                  variant=family.variant(inner))
        if prefix:
            if index.has_prefix("input_blocks.") or index.has_prefix("middle_block."):
                return None  # an LDM UNet (SD1/SD2/SDXL), read by `_ldm_single_file`
            return BaseLayout(path, GENERIC.native_layout, None,
                              {"transformer": build.dit_native(inner, GENERIC, prefix, source),
                               **_dit_text_encoders(shapes, prefix, source)})
        for family in FAMILIES:
            if family.is_diffusers(index):
                return BaseLayout(path, family.diffusers_layout, family.name,
                                  {"transformer": build.dit_diffusers(inner, family, source)},
                                  variant=family.variant(inner))
    return None


def _dit_text_encoders(shapes: Mapping[str, tuple[int, ...]], prefix: str, source: str | None
                       ) -> dict[str | None, Component]:
    """The text encoders beside a DiT saved under a prefix (`DIT_TEXT_ENCODERS`); a bare DiT has none."""
    components: dict[str | None, Component] = {}
    if not prefix:
        return components
    for te_prefix, (name, kind) in DIT_TEXT_ENCODERS.items():
        if inner := _under(shapes, te_prefix):
            components[name] = (build.hf_clip(inner, name, te_prefix, source, keep_stored_names=False) if kind == "hf"
                                else build.transformers_model(inner, source, name, te_prefix))
    return components


def _ldm_single_file(shapes: Mapping[str, tuple[int, ...]], path: Path, source: str | None) -> BaseLayout:
    unet_shapes = _under(shapes, LDM_UNET)
    components: dict[str | None, Component] = {"unet": build.ldm_unet(unet_shapes, LDM_UNET, source)}
    family = _unet_family(unet_shapes)
    for prefix, (name, kind) in LDM_TEXT_ENCODERS.items():
        inner = _under(shapes, prefix)
        if not inner:
            continue
        if kind == "hf":
            components[name] = build.hf_clip(inner, name, prefix, source, keep_stored_names=False)
        else:
            components[name] = build.open_clip(inner, name, prefix, source)
    refiner = _under(shapes, REFINER_TEXT_ENCODER)
    if refiner:
        components["text_encoder_2"] = build.open_clip(refiner, "text_encoder_2", REFINER_TEXT_ENCODER, source)
        family = "SDXL-refiner"
    elif "text_encoder_2" in components:
        family = "SDXL"
    elif any(k.startswith("cond_stage_model.model.") for k in shapes):
        family = "SD2"
    elif any(k.startswith("cond_stage_model.transformer.") for k in shapes):
        family = family or "SD1"
    return BaseLayout(path, "ldm-single-file", family, components)


PIPELINE_FAMILIES = {"StableDiffusionPipeline": None, "StableDiffusionXLPipeline": "SDXL",
                     "StableDiffusionXLImg2ImgPipeline": "SDXL", "FluxPipeline": "Flux",
                     "StableDiffusion3Pipeline": "SD3", "WanPipeline": "Wan", "WanImageToVideoPipeline": "Wan",
                     **{f"QwenImage{task}Pipeline": "Qwen-Image" for task in ("", "Edit", "EditPlus", "Img2Img",
                                                                              "Inpaint", "Layered", "21")},
                     **{f"LTX{task}Pipeline": "LTX-Video" for task in ("", "ImageToVideo", "Condition")},
                     **{f"LTX2{task}Pipeline": "LTX-2" for task in ("", "ImageToVideo", "Condition")},
                     **{f"Chroma{task}Pipeline": "Chroma" for task in ("", "Img2Img", "Inpaint")},
                     **{f"Flux2{task}Pipeline": "Flux.2" for task in ("", "Klein", "KleinInpaint", "KleinKV")},
                     **{f"ZImage{task}Pipeline": "Z-Image" for task in ("", "Img2Img", "Inpaint", "Omni")},
                     "Lumina2Pipeline": "Lumina2"}


def read_model_index(folder: Path) -> dict:
    """A pipeline's `model_index.json`: an object, bounded and type-checked (`jsonio`), or one line."""
    from ..errors import InvalidCheckpointError
    from ..jsonio import MODEL_INDEX_RULES, read_json

    return read_json(folder / "model_index.json", InvalidCheckpointError, rules=MODEL_INDEX_RULES)


def pipeline_components(folder: Path, index: dict | None = None) -> list[str]:
    """Component subfolders of a diffusers pipeline that hold safetensors weights and that LoRAs adapt."""
    index = read_model_index(folder) if index is None else index
    return [name for name in index if name in DIFFUSION_COMPONENTS and (folder / name).is_dir()
            and any((folder / name).glob("*.safetensors"))]


def open_base(path: str | os.PathLike, allow_pickle: bool = False):
    """(layout, {source: Checkpoint}) for a checkpoint or a diffusers pipeline folder. The caller
    closes the checkpoints."""
    from ..checkpoint import open_checkpoint

    path = Path(path)
    if path.is_dir() and (path / "model_index.json").is_file():
        index = read_model_index(path)
        checkpoints, components, families = {}, {}, []
        for name in pipeline_components(path, index):
            checkpoint = open_checkpoint(path / name, allow_pickle=allow_pickle)
            checkpoints[name] = checkpoint
            shapes = {k: info.shape for k, info in checkpoint.items()}
            found = layout_of(shapes, path / name, checkpoint.config(), source=name, component=name)
            for component in found.components.values():
                component.name = name
                components[name] = component
            families.append(found.family)
        class_name = index.get("_class_name")
        family = PIPELINE_FAMILIES.get(class_name, class_name)
        if family is None:
            family = next((f for f in families if f and f.startswith("SD")), None)
        return BaseLayout(path, "diffusers-pipeline", family, components), checkpoints
    checkpoint = open_checkpoint(path, allow_pickle=allow_pickle)
    shapes = {k: info.shape for k, info in checkpoint.items()}
    config = checkpoint.config()
    layout = layout_of(shapes, path, config)
    layout.config = config
    return layout, {None: checkpoint}
