"""HunyuanVideo (13B, T2V and I2V) in its two namings: Tencent's own ("native": `double_blocks.N.img_attn_qkv`,
`single_blocks.N.linear1`, `txt_in.individual_token_refiner.blocks.N.self_attn_qkv`, as the Tencent repo,
ComfyUI and musubi-tuner save it) and diffusers' (`HunyuanVideoTransformer3DModel`: `transformer_blocks`,
`single_transformer_blocks`, `context_embedder.token_refiner.refiner_blocks`, separate q/k/v). Read in
both directions by the generic DiT builders (`dit.py`); checked against diffusers'
`convert_hunyuan_video_transformer_to_diffusers` (tests/test_family_hunyuan_video.py).

Fused native tensors are their diffusers parts stacked by rows: `img_attn_qkv` is [to_q; to_k; to_v],
`txt_attn_qkv` [add_q_proj; add_k_proj; add_v_proj], the token refiner's `self_attn_qkv` [to_q; to_k;
to_v], and `linear1` [to_q; to_k; to_v; proj_mlp] with q/k/v as wide as the block's hidden size (the
input width of `linear1`; diffusers' converters hard-code 3072, the 13B model's width).
`final_layer.adaLN_modulation.1` is `norm_out.linear` with its two row halves swapped (shift, scale) vs
(scale, shift); the token refiner's `adaLN_modulation.1` is not swapped.

The names share `double_blocks.`/`single_blocks.` with Flux's BFL files (and, flattened, kohya names such
as `lora_unet_double_blocks_0_img_attn_qkv`): the token refiner (`txt_in.individual_token_refiner.`,
`context_embedder.token_refiner.`) is what only HunyuanVideo has, so detection requires it, and this
family is registered before Flux. HunyuanVideo 1.5 (`HunyuanVideo15Transformer3DModel`) has a token
refiner too but no single-stream blocks, so it is not claimed; FramePack (HunyuanVideo with extra
image-conditioning modules) is, and its extra modules resolve by their stored names.
"""

from __future__ import annotations

from collections.abc import Mapping

from .dit import Block, DitFamily
from .flux import fused_row_sizes

#: Native leaf in `double_blocks.N.` -> diffusers leaves in `transformer_blocks.N.`, in row order.
DOUBLE_BLOCK = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",),
    "txt_attn_proj": ("attn.to_add_out",),
    "img_attn_q_norm": ("attn.norm_q",),
    "img_attn_k_norm": ("attn.norm_k",),
    "txt_attn_q_norm": ("attn.norm_added_q",),
    "txt_attn_k_norm": ("attn.norm_added_k",),
    "img_mod.linear": ("norm1.linear",),
    "txt_mod.linear": ("norm1_context.linear",),
    "img_mlp.fc1": ("ff.net.0.proj",),
    "img_mlp.fc2": ("ff.net.2",),
    "txt_mlp.fc1": ("ff_context.net.0.proj",),
    "txt_mlp.fc2": ("ff_context.net.2",),
}
#: Native leaf in `single_blocks.N.` -> diffusers leaves in `single_transformer_blocks.N.`.
SINGLE_BLOCK = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "q_norm": ("attn.norm_q",),
    "k_norm": ("attn.norm_k",),
    "modulation.linear": ("norm.linear",),
}
#: Native leaf in `txt_in.individual_token_refiner.blocks.N.` -> diffusers leaves in
#: `context_embedder.token_refiner.refiner_blocks.N.`.
REFINER_BLOCK = {
    "self_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "self_attn_proj": ("attn.to_out.0",),
    "norm1": ("norm1",),
    "norm2": ("norm2",),
    "mlp.fc1": ("ff.net.0.proj",),
    "mlp.fc2": ("ff.net.2",),
    "adaLN_modulation.1": ("norm_out.linear",),
}
#: Top-level native module -> diffusers module.
TOP_LEVEL = {
    "img_in.proj": "x_embedder.proj",
    "txt_in.input_embedder": "context_embedder.proj_in",
    "txt_in.t_embedder.mlp.0": "context_embedder.time_text_embed.timestep_embedder.linear_1",
    "txt_in.t_embedder.mlp.2": "context_embedder.time_text_embed.timestep_embedder.linear_2",
    "txt_in.c_embedder.linear_1": "context_embedder.time_text_embed.text_embedder.linear_1",
    "txt_in.c_embedder.linear_2": "context_embedder.time_text_embed.text_embedder.linear_2",
    "time_in.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "time_in.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.mlp.0": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.mlp.2": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
#: Modules whose two row halves are swapped between the namings.
SWAPPED_HALVES = frozenset({"final_layer.adaLN_modulation.1", "norm_out.linear"})

#: Hidden size -> model size (HunyuanVideo's one published size).
SIZES = {3072: "13B"}
#: Input channels of the patch embedding -> task (I2V concatenates the image latent and a mask).
TASKS = {16: "T2V", 33: "I2V"}


def variant(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """`13B T2V`, `13B I2V` from the patch embedding (native `img_in.proj`, diffusers `x_embedder.proj`)."""
    shape = shapes.get("img_in.proj.weight") or shapes.get("x_embedder.proj.weight")
    if not shape or len(shape) < 2:
        return None
    words = [SIZES.get(shape[0]), TASKS.get(shape[1])]
    return " ".join(w for w in words if w) or None


FAMILY = DitFamily(
    name="HunyuanVideo", native_layout="hunyuan-video-native", diffusers_layout="hunyuan-video-diffusers",
    blocks=(Block("double_blocks", "transformer_blocks", DOUBLE_BLOCK),
            Block("single_blocks", "single_transformer_blocks", SINGLE_BLOCK),
            Block("txt_in.individual_token_refiner.blocks", "context_embedder.token_refiner.refiner_blocks",
                  REFINER_BLOCK)),
    top_level=TOP_LEVEL,
    native_markers=("double_blocks.", "single_blocks.", "txt_in.individual_token_refiner."),
    diffusers_markers=("single_transformer_blocks.", "context_embedder.token_refiner."),
    swapped_halves=SWAPPED_HALVES, fused_rows=fused_row_sizes, variant=variant,
    metadata_prefixes=("hunyuan_video", "hunyuan-video", "hunyuanvideo", "hyvideo"),
    # Names only HunyuanVideo has, dotted or flattened (Flux's kohya names flatten `img_attn.qkv` the same
    # way, so `img_attn_qkv` counts only dotted): the token refiner, `img_mlp.fc1`, `img_mod.linear`,
    # `modulation.linear`, `q_norm`, and dotted `img_attn_qkv`/`img_attn_proj`.
    adapter_names=(r"token_refiner|(img|txt)_mlp[._]fc[12]|(img|txt)_mod[._]linear|single_blocks[._]\d+[._]"
                   r"(modulation[._]linear|[qk]_norm)|\.(img|txt)_attn_(qkv|proj)"),
)
