"""Flux.2 in its two namings: Black Forest Labs' (`double_blocks`, `single_blocks`, fused `qkv`, and
the modulations shared by all blocks of a kind: `double_stream_modulation_img/txt`,
`single_stream_modulation`) and diffusers' `Flux2Transformer2DModel`. Derived from diffusers'
`convert_flux2_transformer_checkpoint_to_diffusers`.

Unlike Flux.1, only the double blocks' `img_attn.qkv`/`txt_attn.qkv` are split in diffusers; a single
block's `linear1` stays fused there too (`attn.to_qkv_mlp_proj`, q/k/v and the SwiGLU MLP input), and
`linear2` is `attn.to_out`. The MLPs are SwiGLU (`img_mlp.0` = `ff.linear_in`, gate and up in one
tensor in both namings). `final_layer.adaLN_modulation.1` is `norm_out.linear` with its row halves
swapped, as in Flux.1. There are no biases.
"""

from __future__ import annotations

from . import flux
from .dit import Block, DitFamily

DOUBLE_BLOCK = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.linear_in",),
    "img_mlp.2": ("ff.linear_out",),
    "txt_mlp.0": ("ff_context.linear_in",),
    "txt_mlp.2": ("ff_context.linear_out",),
    "img_attn.norm.query_norm": ("attn.norm_q",),
    "img_attn.norm.key_norm": ("attn.norm_k",),
    "txt_attn.norm.query_norm": ("attn.norm_added_q",),
    "txt_attn.norm.key_norm": ("attn.norm_added_k",),
}
SINGLE_BLOCK = {
    "linear1": ("attn.to_qkv_mlp_proj",),
    "linear2": ("attn.to_out",),
    "norm.query_norm": ("attn.norm_q",),
    "norm.key_norm": ("attn.norm_k",),
}
TOP_LEVEL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}

FAMILY = DitFamily(
    name="Flux.2", native_layout="flux2-bfl", diffusers_layout="flux2-diffusers",
    blocks=(Block("double_blocks", "transformer_blocks", DOUBLE_BLOCK),
            Block("single_blocks", "single_transformer_blocks", SINGLE_BLOCK)),
    top_level=TOP_LEVEL,
    # Flux.1 files never have the shared modulations: Flux.2's markers (and it comes before Flux).
    native_markers=("double_blocks.", "single_blocks.", "double_stream_modulation_img.lin."),
    diffusers_markers=("single_transformer_blocks.", "double_stream_modulation_img.linear."),
    swapped_halves=flux.SWAPPED_HALVES, norm_param=flux.BFL_NORM_PARAM,
    metadata_prefixes=("flux.2", "flux-2", "flux2", "flux_2"),
    adapter_names=(r"(double|single)_stream_modulation|to_qkv_mlp_proj|ff(_context)?[._]linear_(in|out)"
                   r"|single_transformer_blocks[._]\d+[._]attn[._]to_out(?![._]0)"),
)
