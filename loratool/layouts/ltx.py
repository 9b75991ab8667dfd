"""LTX-Video and LTX-2 (Lightricks) in their two namings: the original (`patchify_proj`, `adaln_single`,
`q_norm`/`k_norm`; LTX-2's `audio_patchify_proj`, `av_ca_*_adaln_single`, `scale_shift_table_a2v_ca_*`)
and diffusers' (`proj_in`, `time_embed`, `norm_q`/`norm_k`, `av_cross_attn_*`), as diffusers'
`convert_ltx_transformer_checkpoint_to_diffusers` and `convert_ltx2_transformer_to_diffusers` rename
them. Nothing is fused: every native module is one diffusers module, and the blocks
(`transformer_blocks.N.attn1`, `attn2`, `ff`; LTX-2's `audio_attn1`, `audio_to_video_attn`, …) keep
their names apart from the q/k norms.

LTX-2's native files also carry LTX-Video's markers (`patchify_proj`, `adaln_single`), so LTX-2 comes
first in the registry.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .dit import Block, DitFamily

#: An AdaLN-single module's linears, in both namings.
_ADALN_LEAVES = ("emb.timestep_embedder.linear_1", "emb.timestep_embedder.linear_2", "linear")


def _adaln(pairs: Mapping[str, str]) -> dict[str, str]:
    return {f"{native}.{leaf}": f"{diffusers}.{leaf}" for native, diffusers in pairs.items() for leaf in _ADALN_LEAVES}


def _qk_norms(attentions: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    return {f"{attn}.{n}_norm": (f"{attn}.norm_{n}",) for attn in attentions for n in "qk"}


LTXV_TOP_LEVEL = {"patchify_proj": "proj_in", **_adaln({"adaln_single": "time_embed"})}
LTXV_BLOCK = _qk_norms(("attn1", "attn2"))

LTX2_TOP_LEVEL = {
    "patchify_proj": "proj_in", "audio_patchify_proj": "audio_proj_in",
    **_adaln({"adaln_single": "time_embed", "audio_adaln_single": "audio_time_embed",
              "av_ca_video_scale_shift_adaln_single": "av_cross_attn_video_scale_shift",
              "av_ca_a2v_gate_adaln_single": "av_cross_attn_video_a2v_gate",
              "av_ca_audio_scale_shift_adaln_single": "av_cross_attn_audio_scale_shift",
              "av_ca_v2a_gate_adaln_single": "av_cross_attn_audio_v2a_gate",
              # LTX-2.3's prompt modulation (renamed by diffusers' LoRA converter, not its single-file one)
              "prompt_adaln_single": "prompt_adaln", "audio_prompt_adaln_single": "audio_prompt_adaln"}),
}
LTX2_BLOCK = {
    **_qk_norms(("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")),
    # block parameters (not modules): listed so that the table names every renamed tensor
    "scale_shift_table_a2v_ca_video": ("video_a2v_cross_attn_scale_shift_table",),
    "scale_shift_table_a2v_ca_audio": ("audio_a2v_cross_attn_scale_shift_table",),
}

_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.")


def ltx_video_variant(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """2B (28 blocks) or 13B (48 blocks, 0.9.7 and later), as diffusers' single-file loader tells them."""
    blocks = {int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))}
    return {28: "2B", 48: "13B"}.get(max(blocks) + 1 if blocks else 0)


FAMILY_LTX2 = DitFamily(
    name="LTX-2", native_layout="ltx2-native", diffusers_layout="ltx2-diffusers",
    blocks=(Block("transformer_blocks", "transformer_blocks", LTX2_BLOCK),), top_level=LTX2_TOP_LEVEL,
    native_markers=("patchify_proj.", "audio_patchify_proj.", "adaln_single.", "transformer_blocks.0.audio_attn1."),
    diffusers_markers=("proj_in.", "audio_proj_in.", "time_embed.", "transformer_blocks.0.audio_attn1."),
    metadata_prefixes=("ltx2", "ltx-2", "ltxv2", "ltx_2"),
    adapter_names=r"(audio_attn1|audio_to_video_attn|video_to_audio_attn|audio_ff|audio_patchify_proj|av_ca_)",
)

FAMILY = DitFamily(
    name="LTX-Video", native_layout="ltx-video-native", diffusers_layout="ltx-video-diffusers",
    blocks=(Block("transformer_blocks", "transformer_blocks", LTXV_BLOCK),), top_level=LTXV_TOP_LEVEL,
    native_markers=("patchify_proj.", "adaln_single.", "transformer_blocks.0.attn2."),
    diffusers_markers=("proj_in.", "time_embed.emb.", "caption_projection.", "transformer_blocks.0.attn2.",
                       "transformer_blocks.0.scale_shift_table"),
    variant=ltx_video_variant, metadata_prefixes=("ltx-video", "ltxv", "ltx_video", "ltxvideo"),
    # block attention only where the name starts with the blocks (an SD UNet's sit under `attentions`)
    adapter_names=r"(patchify_proj|adaln_single)|(^|lora_unet_|lora_transformer_|lycoris_|diffusion_model\.|"
                  r"transformer\.)transformer_blocks[._]\d+[._]attn[12][._]to_(q|k|v|out)",
)
