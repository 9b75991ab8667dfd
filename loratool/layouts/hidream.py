"""HiDream-I1 (Full, Dev, Fast) and HiDream-E1, whose transformer is `HiDreamImageTransformer2DModel`.

HiDream's single file has no names of its own: ComfyUI's model and diffusers' share one naming
(`convert_hidream_transformer_to_diffusers` only strips `model.diffusion_model.`), so the native file is
the diffusers state dict, bare or under `model.diffusion_model.`, and nothing is fused: q/k/v are
separate (`double_stream_blocks.N.block.attn1.to_q`, the text stream's `to_q_t`), and the MoE
feed-forward keeps one tensor per expert (`ff_i.experts.K.w1`, `ff_i.shared_experts.w1`, `ff_i.gate`).
The table is therefore a detector: it names the family and its variant, and every dialect's names
resolve as stored (SimpleTuner's `lycoris_` + flattened names, LoKr and LoHa included).

Full, Dev and Fast share their shapes (they differ in training, not architecture), and so does E1 (an
I1-Full fine-tune that edits in context): shapes give the size only.
"""

from __future__ import annotations

from collections.abc import Mapping

from .dit import DitFamily

HIDREAM_MARKERS = ("double_stream_blocks.", "single_stream_blocks.")
#: Hidden size (the patch embedding's rows) -> model size.
SIZES = {2560: "17B"}


def variant(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    shape = shapes.get("x_embedder.proj.weight")
    return SIZES.get(shape[0]) if shape else None


FAMILY = DitFamily(
    name="HiDream", native_layout="hidream", diffusers_layout="hidream",
    blocks=(), top_level={}, native_markers=HIDREAM_MARKERS, diffusers_markers=HIDREAM_MARKERS,
    variant=variant, metadata_prefixes=("hidream",),
    adapter_names=r"(double_stream_blocks|single_stream_blocks)[._]\d",
)
