"""Wan 2.1 / 2.2 in its two namings: Wan-AI's own ("native": `blocks.N.self_attn.q`, `cross_attn.k_img`,
`head.head`, as the Wan-AI repos, ComfyUI and musubi-tuner save it) and diffusers'
(`WanTransformer3DModel`: `blocks.N.attn1.to_q`, `attn2.add_k_proj`, `proj_out`). Nothing is fused:
every native module is one diffusers module, so the table is a renaming, read in both directions by
the generic DiT builders (`dit.py`). Checked against diffusers' `convert_wan_transformer_to_diffusers`
(tests/test_family_wan.py).

One trap: the block's affine cross-attention norm is `norm3` natively and `norm2` in diffusers (the two
parameter-free norms swap names too, but hold no tensors). The per-block and output `modulation`
parameters (`scale_shift_table` in diffusers) are bare parameters, not modules: no LoRA targets them.

Variants share the table. By shapes: the width (`patch_embedding` rows) gives the size (1536: 1.3B,
3072: TI2V-5B, 5120: 14B), its input channels the task (16 T2V, 36 I2V/FLF2V, 48 TI2V), and the CLIP
image embedding (`img_emb`, and `k_img`/`v_img` in every cross-attention) tells Wan 2.1 I2V/FLF2V from
Wan 2.2's I2V-A14B, which has none. Wan 2.2's A14B models are two experts (high-noise and low-noise
files) of the same shapes as Wan 2.1 14B: shapes cannot tell them apart, or from Wan 2.1 14B T2V.
"""

from __future__ import annotations

from collections.abc import Mapping

from .dit import Block, DitFamily

#: Native leaf in `blocks.N.` -> diffusers leaf in `blocks.N.`.
BLOCK = {
    "self_attn.q": ("attn1.to_q",),
    "self_attn.k": ("attn1.to_k",),
    "self_attn.v": ("attn1.to_v",),
    "self_attn.o": ("attn1.to_out.0",),
    "self_attn.norm_q": ("attn1.norm_q",),
    "self_attn.norm_k": ("attn1.norm_k",),
    "cross_attn.q": ("attn2.to_q",),
    "cross_attn.k": ("attn2.to_k",),
    "cross_attn.v": ("attn2.to_v",),
    "cross_attn.o": ("attn2.to_out.0",),
    "cross_attn.norm_q": ("attn2.norm_q",),
    "cross_attn.norm_k": ("attn2.norm_k",),
    # I2V / FLF2V (Wan 2.1): the CLIP image tokens' keys and values
    "cross_attn.k_img": ("attn2.add_k_proj",),
    "cross_attn.v_img": ("attn2.add_v_proj",),
    "cross_attn.norm_k_img": ("attn2.norm_added_k",),
    "norm3": ("norm2",),  # the affine cross-attention norm
    "ffn.0": ("ffn.net.0.proj",),
    "ffn.2": ("ffn.net.2",),
}
#: Top-level native module -> diffusers module.
TOP_LEVEL = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    # I2V / FLF2V (Wan 2.1): the CLIP image embedding
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
}
#: Bare parameters (not modules, so not LoRA targets): native name -> diffusers name; `N` is a block number.
PARAMETERS = {
    "blocks.N.modulation": "blocks.N.scale_shift_table",
    "head.modulation": "scale_shift_table",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",  # FLF2V
}

#: Width (hidden size) -> model size.
SIZES = {1536: "1.3B", 3072: "5B", 5120: "14B"}
IMAGE_EMBEDDING = ("img_emb.", "condition_embedder.image_embedder.")
FIRST_AND_LAST_FRAME = ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed")
IMAGE_KEYS = ("blocks.0.cross_attn.k_img.weight", "blocks.0.attn2.add_k_proj.weight")


def variant(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """`1.3B T2V (2.1)`, `14B I2V (2.1)`, `A14B I2V (2.2 expert)`, `5B TI2V (2.2)`, … from the patch
    embedding's shape (width and input channels) and the presence of the CLIP image embedding, in
    either naming."""
    patch = shapes.get("patch_embedding.weight")
    if patch is None or len(patch) < 2:
        return None
    width, channels = patch[0], patch[1]
    size = SIZES.get(width, f"width-{width}")
    clip_image = any(k.startswith(IMAGE_EMBEDDING) for k in shapes) or any(k in shapes for k in IMAGE_KEYS)
    if channels == 48 and width == 3072:
        return "5B TI2V (2.2)"
    if channels == 16 and not clip_image:
        return "14B T2V (2.1, or a 2.2 A14B expert)" if width == 5120 else f"{size} T2V (2.1)"
    if channels == 36 and not clip_image:
        return "A14B I2V (2.2 expert)" if width == 5120 else f"{size} I2V (2.2)"
    if clip_image:
        task = "FLF2V" if any(k in shapes for k in FIRST_AND_LAST_FRAME) else "I2V"
        return f"{size} {task} (2.1)"
    return f"{size}, {channels} input channels"


FAMILY = DitFamily(
    name="Wan", native_layout="wan-native", diffusers_layout="wan-diffusers",
    blocks=(Block("blocks", "blocks", BLOCK),),
    top_level=TOP_LEVEL,
    native_markers=("blocks.0.self_attn.", "blocks.0.cross_attn.", "head.head.", "time_projection."),
    diffusers_markers=("blocks.0.attn1.", "blocks.0.attn2.", "condition_embedder.time_proj."),
    variant=variant, metadata_prefixes=("wan",),
    adapter_names=(r"(?:^|\.|lora_unet_|lora_transformer_|lycoris_)blocks[._]\d+[._]"
                   r"(?:self_attn|cross_attn|attn1|attn2|ffn)[._]"),
)
