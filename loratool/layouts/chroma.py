"""Chroma in its two namings: Flux's BFL names without the per-block modulations (`img_mod`,
`txt_mod`, `modulation`, `final_layer.adaLN_modulation`), which one `distilled_guidance_layer`
(an MLP "approximator") replaces, and diffusers' `ChromaTransformer2DModel` names. Derived from
diffusers' `convert_chroma_transformer_checkpoint_to_diffusers`.

The blocks are Flux's (fused `qkv`, `linear1` = [q; k; v; mlp] with q/k/v as wide as the block's
input), read with Flux's tables less the modulations. The approximator's layers are renamed
(`in_layer`/`out_layer` -> `linear_1`/`linear_2`); its `in_proj`, `out_proj` and `norms.N` keep their
names (RMSNorm `scale` -> `weight`).

diffusers' converter hard-codes the hidden size (`inner_dim = 3072`) to split `linear1`; loratool splits
by the tensor's own width, so a Chroma of another width (or a tiny test model) converts as well.
"""

from __future__ import annotations

from . import flux
from .dit import Block, DitFamily

#: The Flux block tables without the modulations Chroma prunes.
DOUBLE_BLOCK = {k: v for k, v in flux.DOUBLE_BLOCK.items() if k not in ("img_mod.lin", "txt_mod.lin")}
SINGLE_BLOCK = {k: v for k, v in flux.SINGLE_BLOCK.items() if k != "modulation.lin"}
#: `distilled_guidance_layer.layers.N.` (native) -> the same path in diffusers.
APPROXIMATOR_LAYER = {"in_layer": ("linear_1",), "out_layer": ("linear_2",)}
TOP_LEVEL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "final_layer.linear": "proj_out",
}

FAMILY = DitFamily(
    name="Chroma", native_layout="chroma-bfl", diffusers_layout="chroma-diffusers",
    blocks=(Block("double_blocks", "transformer_blocks", DOUBLE_BLOCK),
            Block("single_blocks", "single_transformer_blocks", SINGLE_BLOCK),
            Block("distilled_guidance_layer.layers", "distilled_guidance_layer.layers", APPROXIMATOR_LAYER)),
    top_level=TOP_LEVEL,
    # Flux files never have the approximator: these markers are Chroma's alone (Chroma comes before Flux).
    native_markers=("double_blocks.", "single_blocks.", "distilled_guidance_layer."),
    diffusers_markers=("single_transformer_blocks.", "distilled_guidance_layer."),
    norm_param=flux.BFL_NORM_PARAM, fused_rows=flux.fused_row_sizes, metadata_prefixes=("chroma",),
    adapter_names=r"distilled_guidance_layer[._]",
)
