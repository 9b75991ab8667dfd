"""Stable Diffusion 3 / 3.5 (MMDiT) in its two namings: Stability AI's, as its single files and ComfyUI
save it (`joint_blocks.N.{x_block,context_block}`, fused `attn.qkv`), and diffusers'
(`transformer_blocks.N`, separate q/k/v). Read off diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`.

A fused `qkv` is [to_q; to_k; to_v] (the context block's: [add_q_proj; add_k_proj; add_v_proj]), in
equal thirds. SD3.5 adds RMS q/k norms (`ln_q`/`ln_k`), and SD3.5 Medium (MMDiT-X) a second image
self-attention `x_block.attn2` in its first blocks. The last block's context side only feeds the joint
attention (diffusers' `context_pre_only`): it has no `attn.proj` and no `mlp`, and its
`adaLN_modulation.1` is a continuous norm (shift, scale) that diffusers orders (scale, shift), as it
does the final layer's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .dit import Block, DitFamily

#: Native leaf in `joint_blocks.N.` -> diffusers leaves in `transformer_blocks.N.`, in row order.
JOINT_BLOCK = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn.proj": ("attn.to_out.0",),
    "context_block.attn.proj": ("attn.to_add_out",),
    "x_block.attn.ln_q": ("attn.norm_q",),
    "x_block.attn.ln_k": ("attn.norm_k",),
    "context_block.attn.ln_q": ("attn.norm_added_q",),
    "context_block.attn.ln_k": ("attn.norm_added_k",),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "x_block.attn2.proj": ("attn2.to_out.0",),
    "x_block.attn2.ln_q": ("attn2.norm_q",),
    "x_block.attn2.ln_k": ("attn2.norm_k",),
    "x_block.adaLN_modulation.1": ("norm1.linear",),
    "context_block.adaLN_modulation.1": ("norm1_context.linear",),
    "x_block.mlp.fc1": ("ff.net.0.proj",),
    "x_block.mlp.fc2": ("ff.net.2",),
    "context_block.mlp.fc1": ("ff_context.net.0.proj",),
    "context_block.mlp.fc2": ("ff_context.net.2",),
}
#: Top-level native module -> diffusers module (`pos_embed`, a parameter of no module, keeps its place).
TOP_LEVEL = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
SWAPPED_HALVES = frozenset({"final_layer.adaLN_modulation.1", "norm_out.linear"})
_BLOCK_NUMBER = re.compile(r"^(?:joint_blocks|transformer_blocks)\.(\d+)\.")


def last_block_swaps(shapes: Mapping[str, tuple[int, ...]]) -> frozenset[str]:
    """The last block's context modulation, in both namings: a (shift, scale) continuous norm natively,
    (scale, shift) in diffusers, as the converter's `swap_scale_shift` on the last layer says."""
    numbers = {int(m.group(1)) for key in shapes if (m := _BLOCK_NUMBER.match(key))}
    if not numbers:
        return frozenset()
    last = max(numbers)
    return frozenset({f"joint_blocks.{last}.context_block.adaLN_modulation.1",
                      f"transformer_blocks.{last}.norm1_context.linear"})


#: Hidden size -> model size of the released checkpoints (SD3 Medium and SD3.5 Medium: 24 × 64;
#: SD3.5 Large and Large Turbo: 38 × 64).
SIZES = {1536: "Medium", 2432: "Large"}


def variant(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """`SD3 Medium`, `SD3.5 Large`, `SD3.5 Medium`: 3.5 has q/k norms, 3.5 Medium also MMDiT-X's `attn2`;
    the size from the hidden size (a file of another width is just `SD3`/`SD3.5`)."""
    keys = list(shapes)
    dual = any(".attn2." in k for k in keys)
    version = "SD3.5" if dual or any(".ln_q." in k or ".norm_q." in k for k in keys) else "SD3"
    embedder = shapes.get("context_embedder.weight")
    size = "Medium" if dual else SIZES.get(embedder[0]) if embedder else None
    return f"{version} {size}" if size else version


FAMILY = DitFamily(
    name="SD3", native_layout="sd3-native", diffusers_layout="sd3-diffusers",
    blocks=(Block("joint_blocks", "transformer_blocks", JOINT_BLOCK),),
    top_level=TOP_LEVEL, native_markers=("joint_blocks.", "x_embedder.proj."),
    diffusers_markers=("transformer_blocks.0.attn.add_q_proj.", "pos_embed.proj.", "context_embedder."),
    swapped_halves=SWAPPED_HALVES, shape_swapped_halves=last_block_swaps, variant=variant,
    metadata_prefixes=("sd3", "stable-diffusion-3", "stable-diffusion-v3"),
    adapter_names=r"joint_blocks[._]\d+[._](?:x_block|context_block)",
)
