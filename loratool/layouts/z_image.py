"""Z-Image and Lumina2 (Lumina-Image 2.0): one native layout, Lumina's NextDiT (`layers`,
`noise_refiner`, `context_refiner`, each block with a fused `attention.qkv` and `attention.out`, a
SwiGLU `feed_forward.w1/w2/w3`), and two diffusers namings. Derived from diffusers'
`convert_z_image_transformer_checkpoint_to_diffusers` and `convert_lumina2_to_diffusers`.

- **Z-Image** (`ZImageTransformer2DModel`) keeps most native names: only the fused `qkv` is split
  (`attention.to_q/to_k/to_v`), `out` becomes `to_out.0`, `q_norm`/`k_norm` `norm_q`/`norm_k`, and the
  patch embedder and final layer live under the patch size (`all_x_embedder.2-1`,
  `all_final_layer.2-1`). Its blocks' modulation is `adaLN_modulation.0`.
- **Lumina2** (`Lumina2Transformer2DModel`) renames more (`attention` -> `attn`, `w1` -> `linear_1`,
  `adaLN_modulation.1` -> `norm1.linear`, `attention_norm1` -> `norm1.norm`, the embedders under
  `time_caption_embed`, the final layer as `norm_out.linear_1`/`linear_2`). Its `qkv` is grouped-query:
  q as wide as the block (24 heads), k and v narrower (8 heads each).

A native file has the fused `attention.qkv` (a diffusers file the split one; Z-Image's other names
are the same in both), and which of the two it is shows in its blocks' modulation
(`adaLN_modulation.0` in Z-Image, `.1` in Lumina2). diffusers' Lumina2 converter hard-codes the q/k/v split (2304/768/768); loratool
takes q as wide as the block's input and k, v as halves of the rest, which is the split at every width.
"""

from __future__ import annotations

from .dit import Block, DitFamily

#: Z-Image native leaf in `layers.N.` / `noise_refiner.N.` / `context_refiner.N.` -> diffusers leaves.
Z_IMAGE_BLOCK = {
    "attention.qkv": ("attention.to_q", "attention.to_k", "attention.to_v"),
    "attention.out": ("attention.to_out.0",),
    "attention.q_norm": ("attention.norm_q",),
    "attention.k_norm": ("attention.norm_k",),
}
Z_IMAGE_TOP_LEVEL = {
    "x_embedder": "all_x_embedder.2-1",
    "final_layer.linear": "all_final_layer.2-1.linear",
    "final_layer.adaLN_modulation.1": "all_final_layer.2-1.adaLN_modulation.1",
}

#: Lumina2 native leaf -> diffusers leaves, in the modulated blocks (`layers`, `noise_refiner`).
LUMINA2_BLOCK = {
    "attention.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "attention.out": ("attn.to_out.0",),
    "attention.q_norm": ("attn.norm_q",),
    "attention.k_norm": ("attn.norm_k",),
    "feed_forward.w1": ("feed_forward.linear_1",),
    "feed_forward.w2": ("feed_forward.linear_2",),
    "feed_forward.w3": ("feed_forward.linear_3",),
    "adaLN_modulation.1": ("norm1.linear",),
    "attention_norm1": ("norm1.norm",),
    "attention_norm2": ("norm2",),
}
#: The context refiner has no modulation: its first norm is `norm1` itself.
LUMINA2_CONTEXT_BLOCK = {**{k: v for k, v in LUMINA2_BLOCK.items() if not k.startswith("adaLN")},
                         "attention_norm1": ("norm1",)}
LUMINA2_TOP_LEVEL = {
    "cap_embedder.0": "time_caption_embed.caption_embedder.0",
    "cap_embedder.1": "time_caption_embed.caption_embedder.1",
    "t_embedder.mlp.0": "time_caption_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_caption_embed.timestep_embedder.linear_2",
    "final_layer.adaLN_modulation.1": "norm_out.linear_1",
    "final_layer.linear": "norm_out.linear_2",
}


def qkv_rows(path: str, rows: int, width: int, parts: int) -> list[int]:
    """A fused `attention.qkv` of shape (rows, width): q as wide as the block, k and v share the rest
    (equal thirds in Z-Image, grouped-query in Lumina2)."""
    if parts == 3:
        kv = (rows - width) // 2
        return [width, kv, kv]
    return [rows // parts] * parts


def _blocks(block: dict, context: dict) -> tuple[Block, ...]:
    return (Block("layers", "layers", block), Block("noise_refiner", "noise_refiner", block),
            Block("context_refiner", "context_refiner", context))


FAMILY = DitFamily(
    name="Z-Image", native_layout="z-image-native", diffusers_layout="z-image-diffusers",
    blocks=_blocks(Z_IMAGE_BLOCK, Z_IMAGE_BLOCK), top_level=Z_IMAGE_TOP_LEVEL,
    native_markers=("layers.0.attention.qkv.", "layers.0.adaLN_modulation.0.", "noise_refiner.", "cap_embedder."),
    diffusers_markers=("all_x_embedder.", "noise_refiner.", "layers."),
    fused_rows=qkv_rows, metadata_prefixes=("z-image", "z_image", "zimage"),
    adapter_names=(r"(noise_refiner|context_refiner)[._]\d+[._]|all_(x_embedder|final_layer)"
                   r"|layers[._]\d+[._](attention[._](qkv|out|to_)|adaLN_modulation[._]0)"),
)

LUMINA2 = DitFamily(
    name="Lumina2", native_layout="lumina2-native", diffusers_layout="lumina2-diffusers",
    blocks=_blocks(LUMINA2_BLOCK, LUMINA2_CONTEXT_BLOCK), top_level=LUMINA2_TOP_LEVEL,
    native_markers=("layers.0.attention.qkv.", "layers.0.adaLN_modulation.1.", "noise_refiner.", "cap_embedder."),
    diffusers_markers=("time_caption_embed.", "noise_refiner.", "layers."),
    fused_rows=qkv_rows, metadata_prefixes=("lumina2", "lumina-image-2", "lumina_image_2", "lumina-2"),
    # Lumina2's own names only (its modulation `.1`, its diffusers names); the names it shares with
    # Z-Image say Z-Image, which comes after it in the registry.
    adapter_names=(r"(layers|noise_refiner)[._]\d+[._](adaLN_modulation[._]1|norm1[._]linear)"
                   r"|(layers|noise_refiner|context_refiner)[._]\d+[._](attn[._]to_|feed_forward[._]linear_)"
                   r"|time_caption_embed"),
)
