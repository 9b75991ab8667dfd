"""Qwen-Image (and Qwen-Image-Edit, Edit-2509/2511, Layered) and Qwen-Image 2.1.

Qwen-Image's single file has no names of its own: ComfyUI's model and diffusers'
`QwenImageTransformer2DModel` share one naming (diffusers' single-file loader maps the checkpoint
through the identity), so the native file is the diffusers state dict, bare or under
`model.diffusion_model.`. Qwen-Image-Edit has the very same tensors and shapes (the edit image joins
the sequence, not the channels), so shapes cannot tell it from Qwen-Image; Layered adds
`time_text_embed.addition_t_embedding`.

Qwen-Image 2.1 (`QwenImage21Transformer2DModel`, single stream, SwiGLU) differs in one place: ComfyUI
fuses each block's SwiGLU gate and up projections into one `img_mlp.gate_up`, gate rows first
(`convert_qwen_image21_transformer_checkpoint_to_diffusers` chunks it into `gate_layer` and `proj`).
"""

from __future__ import annotations

from collections.abc import Mapping

from .dit import Block, DitFamily

QWEN_MARKERS = ("txt_norm.", "img_in.", "transformer_blocks.0.img_mod.")
QWEN21_MARKERS = ("txt_in.text_norm.", "transformer_blocks.0.img_mlp.")
#: 2.1's native (ComfyUI) block leaf -> diffusers leaves, in row order.
QWEN21_BLOCK = {"img_mlp.gate_up": ("img_mlp.gate_layer", "img_mlp.proj")}


def qwen_image_variant(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """`Layered` where its extra timestep embedding is; None otherwise (Qwen-Image and every Edit share
    their shapes)."""
    if "time_text_embed.addition_t_embedding.weight" in shapes:
        return "Layered"
    return None


FAMILY = DitFamily(
    name="Qwen-Image", native_layout="qwen-image", diffusers_layout="qwen-image",
    blocks=(), top_level={}, native_markers=QWEN_MARKERS, diffusers_markers=QWEN_MARKERS,
    variant=qwen_image_variant, metadata_prefixes=("qwen_image", "qwen-image", "qwenimage"),
    adapter_names=r"transformer_blocks[._]\d+[._](img_mod|txt_mod|img_mlp|txt_mlp)[._]",
)

FAMILY_21 = DitFamily(
    name="Qwen-Image", native_layout="qwen-image-2.1-native", diffusers_layout="qwen-image-2.1-diffusers",
    blocks=(Block("transformer_blocks", "transformer_blocks", QWEN21_BLOCK),), top_level={},
    native_markers=("txt_in.text_norm.", "transformer_blocks.0.img_mlp.gate_up."),
    diffusers_markers=QWEN21_MARKERS, variant=lambda shapes: "2.1",
)
