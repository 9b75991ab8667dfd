"""Which model family an adapter was trained for: from the trainer's metadata when it wrote any
(sd-scripts' `ss_base_model_version`, the modelspec `modelspec.architecture`), otherwise from module
names and shapes."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from .dit_families import FAMILIES

#: `ss_base_model_version` prefixes (sd-scripts) -> family.
#: (Diffusion-transformer families carry their own metadata prefixes and name patterns in their tables,
#: `dit.DitFamily`, consulted in registry order.)
SS_BASE_VERSIONS = (("sdxl", "SDXL"), ("sd_v1", "SD1"), ("sd_v2", "SD2"), ("sd3", "SD3"), ("chroma", "Chroma"))
#: `modelspec.architecture` prefixes -> family.
MODELSPEC_ARCHITECTURES = (("stable-diffusion-xl", "SDXL"), ("stable-diffusion-v1", "SD1"),
                           ("stable-diffusion-v2", "SD2"), ("stable-diffusion-3", "SD3"))
#: SDXL's UNet has ten transformer blocks in its deepest levels; SD1/SD2 have one.
_SDXL_NAMES = re.compile(r"(input_blocks|output_blocks|down_blocks|up_blocks|attentions)[._]\d+[._].*"
                         r"transformer_blocks[._]9[._]|lora_te2_")
#: attn2.to_k input width (the text encoder's hidden size) -> Stable Diffusion family. The one rule for
#: bases (`layouts.layout_of`) and adapters (`adapter_family`) alike.
CROSS_ATTENTION_FAMILIES = {768: "SD1", 1024: "SD2", 2048: "SDXL", 1280: "SDXL-refiner"}


def cross_attention_family(widths: Iterable[int]) -> str | None:
    """The SD family of a UNet from the input widths of its `attn2.to_k` layers (the widest one is the
    text encoder's hidden size); None when there are none, or for a width of no known family."""
    widths = set(widths)
    return CROSS_ATTENTION_FAMILIES.get(max(widths)) if widths else None


def _from_prefixes(value: str, table) -> str | None:
    value = value.lower()
    return next((family for prefix, family in table if value.startswith(prefix)), None)


def adapter_family(names: list[str], input_widths: Mapping[str, int], metadata: Mapping[str, str],
                   ) -> tuple[str | None, str | None]:
    """(diffusion family, how it was found: 'metadata' | 'names'), or (None, None) for anything else
    (an LLM adapter names its base in `base_model`)."""
    dits = tuple((prefix, family.name) for family in FAMILIES for prefix in family.metadata_prefixes)
    version = metadata.get("ss_base_model_version")
    if version and (family := _from_prefixes(version, dits + SS_BASE_VERSIONS)):
        return family, "metadata"
    architecture = metadata.get("modelspec.architecture")
    if architecture and (family := _from_prefixes(architecture, dits + MODELSPEC_ARCHITECTURES)):
        return family, "metadata"
    for dit in FAMILIES:
        if dit.adapter_names and any(re.search(dit.adapter_names, n) for n in names):
            return dit.name, "names"
    if any(_SDXL_NAMES.search(n) for n in names):
        return "SDXL", "names"
    if family := cross_attention_family(w for n, w in input_widths.items() if re.search(r"attn2[._]to_k$", n)):
        return family, "names"
    return None, None
