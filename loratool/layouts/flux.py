"""Flux in its two namings: Black Forest Labs' (`double_blocks`, `single_blocks`, fused `qkv` and
`linear1`) and diffusers' (`transformer_blocks`, `single_transformer_blocks`, separate q/k/v). One
table per block kind, read in both directions by the generic DiT builders (`dit.py`).

A fused BFL tensor is its diffusers parts stacked by rows: `img_attn.qkv` is [to_q; to_k; to_v], and
`linear1` is [to_q; to_k; to_v; proj_mlp] with q/k/v as wide as the block's hidden size (the input
width of `linear1`). `final_layer.adaLN_modulation.1` is `norm_out.linear` with its two row halves
swapped: BFL orders them (shift, scale), diffusers (scale, shift).
"""

from __future__ import annotations

from .dit import Block, DitFamily, equal_rows

#: BFL leaf in `double_blocks.N.` -> diffusers leaves in `transformer_blocks.N.`, in row order.
DOUBLE_BLOCK = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "img_attn.norm.query_norm": ("attn.norm_q",),
    "img_attn.norm.key_norm": ("attn.norm_k",),
    "txt_attn.norm.query_norm": ("attn.norm_added_q",),
    "txt_attn.norm.key_norm": ("attn.norm_added_k",),
}
#: BFL leaf in `single_blocks.N.` -> diffusers leaves in `single_transformer_blocks.N.`.
SINGLE_BLOCK = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
    "norm.query_norm": ("attn.norm_q",),
    "norm.key_norm": ("attn.norm_k",),
}
#: Top-level BFL module -> diffusers module.
TOP_LEVEL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
#: Modules whose two row halves are swapped between the namings.
SWAPPED_HALVES = frozenset({"final_layer.adaLN_modulation.1", "norm_out.linear"})
#: BFL RMSNorm parameters are called `scale`, diffusers' `weight`.
BFL_NORM_PARAM = "scale"


def fused_row_sizes(path: str, rows: int, width: int, parts: int) -> list[int]:
    """Row counts of the parts of a fused BFL weight of shape (rows, width): `linear1`'s q/k/v are as
    wide as its input, the MLP takes the rest."""
    if parts > 1 and path.endswith("linear1"):
        return [width, width, width, rows - 3 * width]
    return equal_rows(path, rows, width, parts)


FAMILY = DitFamily(
    name="Flux", native_layout="flux-bfl", diffusers_layout="flux-diffusers",
    blocks=(Block("double_blocks", "transformer_blocks", DOUBLE_BLOCK),
            Block("single_blocks", "single_transformer_blocks", SINGLE_BLOCK)),
    top_level=TOP_LEVEL, native_markers=("double_blocks.", "single_blocks."),
    diffusers_markers=("single_transformer_blocks.",), swapped_halves=SWAPPED_HALVES, norm_param=BFL_NORM_PARAM,
    fused_rows=fused_row_sizes, metadata_prefixes=("flux",),
    adapter_names=r"(double_blocks|single_blocks|single_transformer_blocks)[._]\d",
)
